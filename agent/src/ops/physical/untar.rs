//! Laying a base backup's tar into a data directory with the archive treated as hostile.
//!
//! The digests in a manifest prove only that the bytes are the ones the manifest names, and
//! whoever can write to the bucket can write both. So nothing in the archive is trusted to stay
//! inside the data directory: only what `pg_basebackup` writes is accepted — directories, regular
//! files and the links of the tablespaces the manifest records (`pg_tblspc/<oid>`); `pg_wal` is a
//! directory, never a link (pg_basebackup writes it as one even where the server's is a link);
//! names are relative and never climb; nothing is written through a symbolic link, not even an allowed one;
//! files are created, never opened when something is already there; setuid, setgid and sticky
//! bits are dropped; and the archive may not unpack to more bytes than its manifest records.
//!
//! The tar crate's `unpack` does not fit: it lays any symbolic link, keeps special mode bits with
//! `preserve_permissions`, and reads GNU long names and pax headers into memory whole, however
//! large they claim to be. Entries are therefore read raw, and those extension headers refused:
//! PostgreSQL's tar writer never emits them (it fails a base backup whose names do not fit the
//! 100-byte field).

use std::{
    ffi::OsStr,
    fs,
    io::{self, Read, Write},
    os::unix::{
        ffi::OsStrExt,
        fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    },
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tar::EntryType;

/// Deeper than anything in a data directory (`base/<db>/<file>`, `pg_replslot/<slot>/<file>`),
/// shallow enough that the recursive walks after the unpack (ownership, clean-up) stay small.
const MAX_DEPTH: usize = 32;

/// Buffer for copying a file's bytes out of the archive.
const COPY_BUFFER: usize = 256 * 1024;

/// Why a base backup was refused: what it holds would reach outside the data directory, or is
/// something `pg_basebackup` never writes. Every variant names the entry.
#[derive(Debug, thiserror::Error)]
pub enum UntarError {
    /// A name that is absolute, climbs with `..`, is too deep, or names the directory itself.
    #[error("entry {entry:?} {why}")]
    UnsafePath {
        /// The entry's name as stored.
        entry: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A hard link, device node, FIFO or extension header.
    #[error("entry {entry:?} is {kind}, which pg_basebackup never writes")]
    Kind {
        /// The entry's name as stored.
        entry: String,
        /// What it is.
        kind: String,
    },
    /// A symbolic link other than `pg_tblspc/<oid>` of a tablespace the manifest records.
    #[error(
        "entry {entry:?} is a symbolic link to {target:?}; a base backup holds none but pg_tblspc/<oid> of the tablespaces its manifest records (pg_wal is a directory in every base backup)"
    )]
    Symlink {
        /// The entry's name as stored.
        entry: String,
        /// Where it points.
        target: String,
    },
    /// An entry below a symbolic link the archive laid: writing it would follow the link.
    #[error(
        "entry {entry:?} lies below {link:?}, a symbolic link, and writing it would follow that link out of the data directory"
    )]
    ThroughSymlink {
        /// The entry's name as stored.
        entry: String,
        /// The symbolic link on its way.
        link: String,
    },
    /// An entry whose path the archive laid down already (a duplicate, or a file where a
    /// directory must be).
    #[error("entry {entry:?} names a path the archive already laid down as {found}")]
    Clash {
        /// The entry's name as stored.
        entry: String,
        /// What is there.
        found: &'static str,
    },
    /// A file the restore writes into (recovery settings) is not a regular file.
    #[error(
        "{file} in the base backup is {found}, not a regular file, and writing the recovery settings would follow it out of the data directory"
    )]
    NotAFile {
        /// The file, relative to the data directory.
        file: &'static str,
        /// What is there.
        found: &'static str,
    },
    /// More bytes than the manifest records (a decompression bomb).
    #[error("the base backup unpacks to more than its manifest's {limit} bytes")]
    TooLarge {
        /// The manifest's raw size.
        limit: u64,
    },
    /// Not a readable tar stream, or one that ends inside an entry.
    #[error("the base backup is not a well-formed tar archive: {reason}")]
    Malformed {
        /// What the reader found.
        reason: String,
    },
}

/// Why an unpack stopped.
#[derive(Debug)]
pub enum Stop {
    /// The archive holds something a base backup never does.
    Refused(UntarError),
    /// The filesystem failed (disk full, permissions); the error names the entry.
    Io(io::Error),
}

impl From<UntarError> for Stop {
    fn from(e: UntarError) -> Self {
        Stop::Refused(e)
    }
}

/// Unpacks the tar stream `input` into `dir` (existing and empty), refusing anything that could
/// reach outside it, and reading at most `limit` bytes (the manifest's raw size) of `input`. No
/// symbolic link at all is laid: a base backup taken to a stream (as this agent takes them) holds
/// no tablespace, since pg_basebackup refuses to write a cluster with one to a single stream.
///
/// On error, whatever was laid down so far stays in `dir` for the caller to remove; nothing was
/// written outside it.
pub fn unpack<R: Read>(input: R, dir: &Path, limit: u64) -> Result<(), Stop> {
    unpack_with_tablespaces(input, dir, limit, &[])
}

/// [`unpack`], laying `pg_tblspc/<oid>` links for the tablespace OIDs in `tablespaces` (what the
/// base backup's manifest records) and refusing every other link.
pub fn unpack_with_tablespaces<R: Read>(
    input: R,
    dir: &Path,
    limit: u64,
    tablespaces: &[u32],
) -> Result<(), Stop> {
    let mut capped = Capped {
        inner: input,
        left: limit,
        exceeded: false,
    };
    let mut laid = lay_entries(&mut capped, dir, limit, tablespaces);
    if laid.is_ok() {
        // The reader stops at the first end-of-archive block: read the second (and any padding),
        // so the download delivers every byte and checks its digests instead of finding no reader.
        laid = io::copy(&mut capped, &mut io::sink())
            .map(drop)
            .map_err(malformed);
    }
    if capped.exceeded {
        return Err(UntarError::TooLarge { limit }.into());
    }
    laid
}

/// Reads at most `left` bytes of `inner`; reading past them is an error (and recorded), so a
/// stream that decodes to more than its manifest says stops there, whatever its headers claim.
struct Capped<R> {
    inner: R,
    left: u64,
    exceeded: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            // One byte past the limit is enough to know; the end of input is fine.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.exceeded = true;
                    Err(io::Error::other("more bytes than the manifest records"))
                }
            };
        }
        let max = usize::try_from(self.left)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

fn malformed(e: io::Error) -> Stop {
    UntarError::Malformed {
        reason: e.to_string(),
    }
    .into()
}

/// The entry's name for messages: lossy, and short, since a forged one can be long.
fn shown(raw: &[u8]) -> String {
    crate::error::shorten(String::from_utf8_lossy(raw).into_owned(), 200)
}

/// The components of a stored name, relative to the data directory (`.` and empty ones
/// dropped), or why the name is refused.
fn components(raw: &[u8]) -> Result<Vec<&OsStr>, &'static str> {
    if raw.first() == Some(&b'/') {
        return Err("is an absolute path");
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => return Err("climbs out of the data directory with `..`"),
            _ => parts.push(OsStr::from_bytes(part)),
        }
    }
    if parts.len() > MAX_DEPTH {
        return Err("is nested deeper than anything in a data directory");
    }
    Ok(parts)
}

/// The symbolic links a base backup may lay: `pg_tblspc/<oid>` of each recorded tablespace, its
/// OID written as PostgreSQL writes it (decimal, no leading zero). `pg_wal` is not one: a link
/// there would send the restored server's WAL wherever the archive points.
fn link_allowed(parts: &[&OsStr], tablespaces: &[u32]) -> bool {
    match parts {
        [tblspc, oid] => {
            tblspc.as_bytes() == b"pg_tblspc"
                && tablespaces
                    .iter()
                    .any(|t| t.to_string().as_bytes() == oid.as_bytes())
        }
        _ => false,
    }
}

/// What a `symlink_metadata` found, for messages.
pub(super) fn found(meta: &fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a special file"
    }
}

/// An I/O error that names the entry.
fn io_at<'a>(action: &'static str, entry: &'a str) -> impl FnOnce(io::Error) -> Stop + 'a {
    move |e| Stop::Io(io::Error::new(e.kind(), format!("{action} {entry:?}: {e}")))
}

fn lay_entries<R: Read>(input: R, dir: &Path, limit: u64, tablespaces: &[u32]) -> Result<(), Stop> {
    let mut archive = tar::Archive::new(input);
    let entries = archive.entries().map_err(malformed)?.raw(true);
    let mut buf = vec![0u8; COPY_BUFFER];
    for entry in entries {
        let mut entry = entry.map_err(malformed)?;
        let raw_name = entry.path_bytes().into_owned();
        let name = shown(&raw_name);
        // A header claiming more than the manifest's size is refused before a byte is written.
        if entry
            .raw_file_position()
            .checked_add(entry.size())
            .is_none_or(|end| end > limit)
        {
            return Err(UntarError::TooLarge { limit }.into());
        }
        let kind = entry.header().entry_type();
        refuse_kind(kind, &name)?;
        let parts = components(&raw_name).map_err(|why| UntarError::UnsafePath {
            entry: name.clone(),
            why,
        })?;
        let Some((last, parents)) = parts.split_last() else {
            if kind.is_dir() {
                // The data directory itself: prepared (mode 0700) before the unpack.
                continue;
            }
            return Err(UntarError::UnsafePath {
                entry: name,
                why: "names the data directory itself",
            }
            .into());
        };
        let parent = parent_dirs(dir, parents, &name)?;
        let path = parent.join(last);
        let mode = entry.header().mode().map_err(malformed)?;
        match kind {
            EntryType::Directory => {
                make_dir(&path, &name)?;
                // Only the permission bits; the owner keeps rwx so the entries below can be laid.
                fs::set_permissions(&path, fs::Permissions::from_mode((mode & 0o777) | 0o700))
                    .map_err(io_at("setting the mode of", &name))?;
            }
            EntryType::Symlink => lay_symlink(&entry, &parts, tablespaces, &path, &name)?,
            _ => {
                let meta = FileMeta {
                    size: entry.size(),
                    mode,
                    mtime: entry.header().mtime().ok(),
                };
                write_file(&mut entry, &path, &name, meta, &mut buf)?;
            }
        }
    }
    Ok(())
}

/// Only regular files, directories and symbolic links are laid down; anything else in a base
/// backup's tar is refused by what it is.
fn refuse_kind(kind: EntryType, name: &str) -> Result<(), UntarError> {
    let refused_kind = |kind: &str| UntarError::Kind {
        entry: name.to_string(),
        kind: kind.to_string(),
    };
    match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::Directory | EntryType::Symlink => {
            Ok(())
        }
        EntryType::Link => Err(refused_kind("a hard link")),
        EntryType::Char => Err(refused_kind("a character device")),
        EntryType::Block => Err(refused_kind("a block device")),
        EntryType::Fifo => Err(refused_kind("a FIFO")),
        EntryType::GNULongName | EntryType::GNULongLink => {
            Err(refused_kind("a GNU long-name header"))
        }
        EntryType::XHeader | EntryType::XGlobalHeader => Err(refused_kind("a pax extended header")),
        EntryType::GNUSparse => Err(refused_kind("a sparse file")),
        other => Err(refused_kind(&format!(
            "an entry of unknown type {:?}",
            char::from(other.as_byte())
        ))),
    }
}

/// A symbolic link, only where PostgreSQL puts them (a tablespace's link in `pg_tblspc`).
fn lay_symlink<R: Read>(
    entry: &tar::Entry<'_, R>,
    parts: &[&OsStr],
    tablespaces: &[u32],
    path: &Path,
    name: &str,
) -> Result<(), Stop> {
    let target = entry.link_name_bytes().unwrap_or_default().into_owned();
    if !link_allowed(parts, tablespaces) {
        return Err(UntarError::Symlink {
            entry: name.to_string(),
            target: shown(&target),
        }
        .into());
    }
    if target.is_empty() {
        return Err(UntarError::Malformed {
            reason: format!("symbolic link {name:?} has no target"),
        }
        .into());
    }
    std::os::unix::fs::symlink(OsStr::from_bytes(&target), path)
        .map_err(|e| clash_or(e, path, name, "creating the symbolic link"))
}

/// Walks (creating, mode 0700) the directories above an entry, refusing to pass through anything
/// but a real directory: a symbolic link the archive laid (even `pg_wal`) is never followed.
fn parent_dirs(dir: &Path, parents: &[&OsStr], entry: &str) -> Result<PathBuf, Stop> {
    let mut path = dir.to_path_buf();
    for (i, part) in parents.iter().enumerate() {
        path.push(part);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                let link = parents[..=i]
                    .iter()
                    .map(|p| p.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                return Err(UntarError::ThroughSymlink {
                    entry: entry.to_string(),
                    link,
                }
                .into());
            }
            Ok(m) => {
                return Err(UntarError::Clash {
                    entry: entry.to_string(),
                    found: found(&m),
                }
                .into());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                make_dir(&path, entry)?;
            }
            Err(e) => return Err(io_at("inspecting the parent of", entry)(e)),
        }
    }
    Ok(path)
}

/// Creates a directory, or accepts one that is there (a repeated entry, or one created as a
/// parent first); anything else there is a clash.
fn make_dir(path: &Path, entry: &str) -> Result<(), Stop> {
    match fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(m) => Err(UntarError::Clash {
                entry: entry.to_string(),
                found: found(&m),
            }
            .into()),
            Err(e) => Err(io_at("inspecting", entry)(e)),
        },
        Err(e) => Err(io_at("creating the directory", entry)(e)),
    }
}

/// An `AlreadyExists` from creating `path` as the clash it is; other errors as I/O errors.
fn clash_or(e: io::Error, path: &Path, entry: &str, action: &'static str) -> Stop {
    if e.kind() == io::ErrorKind::AlreadyExists
        && let Ok(m) = fs::symlink_metadata(path)
    {
        return UntarError::Clash {
            entry: entry.to_string(),
            found: found(&m),
        }
        .into();
    }
    io_at(action, entry)(e)
}

/// What a file entry's header says besides its name.
struct FileMeta {
    size: u64,
    mode: u32,
    mtime: Option<u64>,
}

/// Creates the file (never opening one that exists: `O_EXCL` does not follow a symbolic link
/// either), copies the entry's bytes and sets its permission bits, special bits dropped.
fn write_file(
    entry: &mut impl Read,
    path: &Path,
    name: &str,
    meta: FileMeta,
    buf: &mut [u8],
) -> Result<(), Stop> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| clash_or(e, path, name, "creating"))?;
    let mut written = 0u64;
    loop {
        let n = entry.read(buf).map_err(malformed)?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(io_at("writing", name))?;
        written += n as u64;
    }
    // The tar reader takes the end of its input for the end of the archive, without an error.
    if written != meta.size {
        return Err(UntarError::Malformed {
            reason: format!(
                "the archive ends inside {name:?} ({written} of its {} bytes)",
                meta.size
            ),
        }
        .into());
    }
    file.set_permissions(fs::Permissions::from_mode(meta.mode & 0o777))
        .map_err(io_at("setting the mode of", name))?;
    if let Some(t) = meta
        .mtime
        .and_then(|s| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(s)))
    {
        file.set_modified(t)
            .map_err(io_at("setting the modification time of", name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// An archive builder whose headers are written as given: the tar crate's own setters refuse
    /// `..` and absolute names, which is exactly what a forger would not use.
    struct Forge(tar::Builder<Vec<u8>>);

    impl Forge {
        fn new() -> Self {
            Forge(tar::Builder::new(Vec::new()))
        }

        fn header(name: &[u8], kind: EntryType, mode: u32, size: u64) -> tar::Header {
            let mut h = tar::Header::new_ustar();
            let field = &mut h.as_old_mut().name;
            field.fill(0);
            field[..name.len()].copy_from_slice(name);
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_size(size);
            h.set_mtime(1_700_000_000);
            h.set_cksum();
            h
        }

        fn dir(mut self, name: &str, mode: u32) -> Self {
            let h = Self::header(name.as_bytes(), EntryType::Directory, mode, 0);
            self.0.append(&h, io::empty()).unwrap();
            self
        }

        fn file(mut self, name: &[u8], mode: u32, data: &[u8]) -> Self {
            let h = Self::header(name, EntryType::Regular, mode, data.len() as u64);
            self.0.append(&h, data).unwrap();
            self
        }

        fn special(mut self, name: &str, kind: EntryType, link: &str) -> Self {
            let mut h = Self::header(name.as_bytes(), kind, 0o777, 0);
            h.set_link_name(link).unwrap();
            h.set_cksum();
            self.0.append(&h, io::empty()).unwrap();
            self
        }

        fn build(self) -> Vec<u8> {
            self.0.into_inner().unwrap()
        }
    }

    /// Unpacks into a fresh directory `pgdata` below a temporary directory that also holds
    /// `outside`, a file a hostile archive would like to reach.
    fn unpack_into(tar: &[u8], limit: u64) -> (tempfile::TempDir, PathBuf, Result<(), Stop>) {
        unpack_into_with(tar, limit, &[])
    }

    /// [`unpack_into`] for a base backup whose manifest records `tablespaces`.
    fn unpack_into_with(
        tar: &[u8],
        limit: u64,
        tablespaces: &[u32],
    ) -> (tempfile::TempDir, PathBuf, Result<(), Stop>) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pgdata");
        fs::create_dir(&dir).unwrap();
        fs::write(tmp.path().join("outside"), b"precious").unwrap();
        let result = unpack_with_tablespaces(tar, &dir, limit, tablespaces);
        (tmp, dir, result)
    }

    fn refusal(result: Result<(), Stop>) -> UntarError {
        match result {
            Err(Stop::Refused(e)) => e,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn outside_intact(tmp: &tempfile::TempDir) {
        assert_eq!(fs::read(tmp.path().join("outside")).unwrap(), b"precious");
        let names: Vec<_> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            names.len(),
            2,
            "something appeared beside the data directory: {names:?}"
        );
    }

    #[test]
    fn a_data_directory_unpacks_with_its_modes_and_links() {
        let tar = Forge::new()
            .dir("base/", 0o700)
            .dir("base/1/", 0o750)
            .file(b"base/1/1259", 0o600, b"heap")
            .file(b"PG_VERSION", 0o640, b"15\n")
            .dir("pg_wal/", 0o700)
            .dir("pg_tblspc/", 0o700)
            .special("pg_tblspc/16384", EntryType::Symlink, "/mnt/ts")
            .build();
        let (tmp, dir, result) = unpack_into_with(&tar, tar.len() as u64, &[16384]);
        result.unwrap();
        assert_eq!(fs::read(dir.join("base/1/1259")).unwrap(), b"heap");
        let mode = |p: &str| fs::symlink_metadata(dir.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("base/1"), 0o750);
        assert_eq!(mode("PG_VERSION"), 0o640);
        assert!(fs::symlink_metadata(dir.join("pg_wal")).unwrap().is_dir());
        assert_eq!(
            fs::read_link(dir.join("pg_tblspc/16384")).unwrap(),
            Path::new("/mnt/ts")
        );
        outside_intact(&tmp);
    }

    /// A forged backup shipping a setuid-root shell: restored as root, it would be one.
    #[test]
    fn special_mode_bits_are_dropped() {
        let tar = Forge::new()
            .file(b"tool", 0o4755, b"#!/bin/sh\n")
            .file(b"group", 0o2750, b"")
            .dir("sticky/", 0o1777)
            .build();
        let (_tmp, dir, result) = unpack_into(&tar, tar.len() as u64);
        result.unwrap();
        let mode = |p: &str| fs::symlink_metadata(dir.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("tool"), 0o755);
        assert_eq!(mode("group"), 0o750);
        assert_eq!(mode("sticky"), 0o777);
    }

    /// The measured attack: `recovery.signal` as a link to a file outside, which the restore then
    /// truncated when it wrote the signal file (as root, any file on the host).
    #[test]
    fn a_symbolic_link_out_of_the_directory_is_refused() {
        let tar = Forge::new()
            .file(b"PG_VERSION", 0o600, b"15\n")
            .special("recovery.signal", EntryType::Symlink, "../outside")
            .build();
        let (tmp, dir, result) = unpack_into(&tar, tar.len() as u64);
        let err = refusal(result);
        assert!(matches!(&err, UntarError::Symlink { entry, .. } if entry == "recovery.signal"));
        assert!(err.to_string().contains("recovery.signal"), "{err}");
        assert!(fs::symlink_metadata(dir.join("recovery.signal")).is_err());
        outside_intact(&tmp);
    }

    /// `pg_wal` is never a link, and a tablespace link only one the manifest records, named by
    /// its OID as PostgreSQL names it.
    #[test]
    fn allowed_link_names_only_where_a_data_directory_has_them() {
        for name in [
            "pg_wal",
            "base/pg_wal",
            "pg_tblspc/x",
            "pg_tblspc/1/2",
            "pg_tblspc/16385",
            "pg_tblspc/016384",
            "global/pg_control",
        ] {
            let tar = Forge::new()
                .special(name, EntryType::Symlink, "/etc")
                .build();
            let (tmp, _dir, result) = unpack_into_with(&tar, tar.len() as u64, &[16384]);
            assert!(
                matches!(refusal(result), UntarError::Symlink { .. }),
                "{name}"
            );
            outside_intact(&tmp);
        }
    }

    /// Models writing through an allowed link: a recorded tablespace's link → a directory
    /// outside, then an entry below it, which would land there.
    #[test]
    fn an_entry_below_a_symbolic_link_is_refused() {
        let tar = Forge::new()
            .dir("pg_tblspc/", 0o700)
            .special("pg_tblspc/16384", EntryType::Symlink, "../..")
            .file(b"pg_tblspc/16384/outside", 0o600, b"overwritten")
            .build();
        let (tmp, _dir, result) = unpack_into_with(&tar, tar.len() as u64, &[16384]);
        let err = refusal(result);
        assert!(
            matches!(&err, UntarError::ThroughSymlink { entry, link } if entry == "pg_tblspc/16384/outside" && link == "pg_tblspc/16384"),
            "{err}"
        );
        outside_intact(&tmp);

        // A directory entry on top of the link is refused too.
        let tar = Forge::new()
            .dir("pg_tblspc/", 0o700)
            .special("pg_tblspc/16384", EntryType::Symlink, "../..")
            .dir("pg_tblspc/16384/", 0o700)
            .build();
        let (tmp, _dir, result) = unpack_into_with(&tar, tar.len() as u64, &[16384]);
        assert!(matches!(refusal(result), UntarError::Clash { .. }));
        outside_intact(&tmp);
    }

    /// Models overwriting through a second entry of the same name (a file after a link).
    #[test]
    fn an_entry_never_opens_what_is_there() {
        let tar = Forge::new()
            .dir("pg_tblspc/", 0o700)
            .special("pg_tblspc/16384", EntryType::Symlink, "../../outside")
            .file(b"pg_tblspc/16384", 0o600, b"overwritten")
            .build();
        let (tmp, _dir, result) = unpack_into_with(&tar, tar.len() as u64, &[16384]);
        assert!(matches!(
            refusal(result),
            UntarError::Clash {
                found: "a symbolic link",
                ..
            }
        ));
        outside_intact(&tmp);
    }

    /// Models the classic tar traversal (`../x`) and absolute names (`/etc/cron.d/x`).
    #[test]
    fn names_that_climb_or_are_absolute_are_refused() {
        for name in [
            &b"../outside"[..],
            b"base/../../outside",
            b"/tmp/soma-untar-abs",
        ] {
            let tar = Forge::new().file(name, 0o600, b"overwritten").build();
            let (tmp, _dir, result) = unpack_into(&tar, tar.len() as u64);
            assert!(
                matches!(refusal(result), UntarError::UnsafePath { .. }),
                "{}",
                String::from_utf8_lossy(name)
            );
            outside_intact(&tmp);
        }
        assert!(!Path::new("/tmp/soma-untar-abs").exists());
    }

    /// Hard links (to /etc/shadow, say), device nodes and FIFOs give access beyond the archive.
    #[test]
    fn hard_links_devices_and_fifos_are_refused() {
        for kind in [
            EntryType::Link,
            EntryType::Char,
            EntryType::Block,
            EntryType::Fifo,
            EntryType::GNULongName,
            EntryType::XHeader,
        ] {
            let tar = Forge::new().special("global/x", kind, "../outside").build();
            let (tmp, dir, result) = unpack_into(&tar, tar.len() as u64);
            assert!(
                matches!(refusal(result), UntarError::Kind { .. }),
                "{kind:?}"
            );
            assert!(fs::symlink_metadata(dir.join("global/x")).is_err());
            outside_intact(&tmp);
        }
    }

    /// Models a decompression bomb whose header admits its size: refused at the header, before
    /// its data is read.
    #[test]
    fn an_entry_larger_than_the_manifest_is_refused_at_its_header() {
        let big = vec![0u8; 1 << 20];
        let tar = Forge::new().file(b"base/big", 0o600, &big).build();
        let (_tmp, dir, result) = unpack_into(&tar, 64 * 1024);
        assert!(matches!(
            refusal(result),
            UntarError::TooLarge { limit: 65536 }
        ));
        assert!(fs::symlink_metadata(dir.join("base/big")).is_err());
    }

    /// Models a bomb made of many entries, or of bytes after the end of the archive, each header
    /// within the limit: the reader stops at the limit.
    #[test]
    fn reading_past_the_manifest_size_is_refused() {
        let tar = Forge::new().file(b"a", 0o600, &[7u8; 4096]).build();
        let (_tmp, _dir, result) = unpack_into(&tar, tar.len() as u64 - 1);
        let err = refusal(result);
        assert!(matches!(err, UntarError::TooLarge { .. }), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("more than its manifest's {} bytes", tar.len() - 1)),
            "{err}"
        );

        let mut padded = tar.clone();
        padded.extend_from_slice(&[0u8; 10240]);
        let (_tmp, _dir, result) = unpack_into(&padded, tar.len() as u64);
        assert!(matches!(refusal(result), UntarError::TooLarge { .. }));
    }

    /// An archive cut inside a file is not taken for a complete one.
    #[test]
    fn an_archive_ending_inside_a_file_is_refused() {
        let tar = Forge::new().file(b"a", 0o600, &[7u8; 4096]).build();
        let cut = &tar[..512 + 1000];
        let (_tmp, _dir, result) = unpack_into(cut, tar.len() as u64);
        let err = refusal(result);
        assert!(err.to_string().contains("ends inside \"a\""), "{err}");
    }

    #[test]
    fn names_are_checked_component_by_component() {
        let ok = |s: &str| components(s.as_bytes()).unwrap().len();
        assert_eq!(ok("./base/1/"), 2);
        assert_eq!(ok("a//b"), 2);
        assert_eq!(ok("."), 0);
        assert!(components(b"a/..").is_err());
        assert!(components("a/".repeat(MAX_DEPTH + 1).as_bytes()).is_err());
        fn tblspc(oid: &str) -> [&OsStr; 2] {
            [OsStr::new("pg_tblspc"), OsStr::new(oid)]
        }
        assert!(link_allowed(&tblspc("16384"), &[16384]));
        assert!(!link_allowed(&tblspc("16384"), &[]));
        assert!(!link_allowed(&tblspc(""), &[16384]));
        assert!(!link_allowed(&[OsStr::new("pg_wal")], &[16384]));
    }
}
