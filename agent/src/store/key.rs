//! Object keys as a checked value: a [`Key`] exists only once its text cannot escape the store's
//! prefix, so what holds one need not check it again. The first step of issue 24's validated keys:
//! the backends check with the same rules ([`Key::check`]); the `Store` methods still take `&str`.

use std::fmt;

use super::StoreError;

/// A key relative to the store's prefix, `/`-separated, with no empty, `.` or `..` component and
/// not absolute. Made only by [`Key::new`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// Checks `key` and takes it; a key read from a listing or a manifest goes through here, since
    /// anyone who can write the bucket chooses it.
    pub fn new(key: impl Into<String>) -> Result<Self, StoreError> {
        let key = key.into();
        Self::check(&key)?;
        Ok(Self(key))
    }

    /// The rules of [`Key::new`] on borrowed text, for a backend handed a `&str`.
    pub fn check(key: &str) -> Result<(), StoreError> {
        let bad = |reason| {
            Err(StoreError::InvalidKey {
                key: key.to_string(),
                reason,
            })
        };
        if key.is_empty() {
            return bad("empty key");
        }
        if key.starts_with('/') {
            return bad("absolute key");
        }
        if key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return bad("empty, '.' or '..' path component");
        }
        Ok(())
    }

    /// The key's text, as the backends send it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Key {
    type Error = StoreError;

    fn try_from(key: String) -> Result<Self, StoreError> {
        Self::new(key)
    }
}

impl TryFrom<&str> for Key {
    type Error = StoreError;

    fn try_from(key: &str) -> Result<Self, StoreError> {
        Self::new(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_prefix() {
        let key = Key::new("backups/x/manifest.json").unwrap();
        assert_eq!(key.as_str(), "backups/x/manifest.json");
        assert_eq!(key.to_string(), "backups/x/manifest.json");
        assert!(Key::new("wal/1/00000001.history.3c.0.ab.zst").is_ok());
        for (bad, why) in [
            ("", "empty key"),
            ("/etc/passwd", "absolute key"),
            ("backups/../x", "'..'"),
            ("..", "'..'"),
            ("a//b", "empty"),
            ("./a", "'.'"),
            ("a/.", "'.'"),
            ("a/", "empty"),
        ] {
            let err = Key::new(bad).expect_err(bad);
            assert!(
                matches!(&err, StoreError::InvalidKey { key, reason } if key == bad && reason.contains(why)),
                "{bad:?}: {err}"
            );
            assert!(Key::try_from(bad).is_err(), "{bad:?}");
            assert!(Key::check(bad).is_err(), "{bad:?}");
        }
    }
}
