//! What ships: `scripts/split-debuginfo.sh`, which the image build (and a release) runs on the
//! binaries, and the Dockerfile's use of it.
//!
//! No release build here (it takes minutes): the script is run on copies of the debug-profile
//! `kubectl-soma` that every `cargo test` builds (line tables for our crates, like the release
//! profile) and on a small program built by `rustc` with the release profile's debug level, and
//! the results are checked with the tools a user would reach for (readelf, nm, addr2line, a
//! panic's backtrace).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use soma_tests::bin_path;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (binutils and rustc are needed)"))
}

fn split(bins: &[&Path]) -> Output {
    run(Command::new(repo().join("scripts/split-debuginfo.sh")).args(bins))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Section names of an ELF file, as `readelf -S` lists them.
fn sections(path: &Path) -> Vec<String> {
    let out = run(Command::new("readelf").args(["-S", "-W"]).arg(path));
    assert!(
        out.status.success(),
        "readelf -S {}: {}",
        path.display(),
        text(&out.stderr)
    );
    text(&out.stdout)
        .lines()
        .filter_map(|line| {
            let rest = line.trim_start().strip_prefix('[')?;
            let (_, rest) = rest.split_once(']')?;
            rest.split_whitespace().next().map(str::to_owned)
        })
        .collect()
}

/// Sections holding debug info (`.debug_gdb_scripts` is a few loaded bytes naming gdb's pretty
/// printers, not debug info).
fn debug_sections(path: &Path) -> Vec<String> {
    sections(path)
        .into_iter()
        .filter(|s| {
            (s.starts_with(".debug_") || s.starts_with(".zdebug_")) && s != ".debug_gdb_scripts"
        })
        .collect()
}

/// `addr2line -f -C` for one address: (function, file:line).
fn symbolise(binary: &Path, address: &str) -> (String, String) {
    let out = run(Command::new("addr2line")
        .args(["-f", "-C", "-e"])
        .arg(binary)
        .arg(address));
    assert!(out.status.success(), "addr2line: {}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    (
        lines.next().unwrap_or_default().to_owned(),
        lines.next().unwrap_or_default().to_owned(),
    )
}

#[test]
fn split_binary_has_no_debug_info_runs_the_same_and_is_symbolised_from_its_debug_file() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("kubectl-soma");
    fs::copy(bin_path("kubectl-soma"), &bin).unwrap();
    let before = fs::metadata(&bin).unwrap().len();
    assert!(
        debug_sections(&bin).contains(&".debug_line".to_owned()),
        "the test binary has no line tables to split off: {:?}",
        sections(&bin)
    );
    let version = run(Command::new(&bin).arg("--version"));

    let out = split(&[&bin]);
    assert!(
        out.status.success(),
        "split-debuginfo.sh failed: {}",
        text(&out.stderr)
    );

    assert_eq!(
        debug_sections(&bin),
        Vec::<String>::new(),
        "debug info left in the binary"
    );
    assert!(
        sections(&bin).contains(&".symtab".to_owned()),
        "symbols must stay (backtraces)"
    );
    let after = fs::metadata(&bin).unwrap().len();
    assert!(
        after < before,
        "binary not smaller: {before} -> {after} bytes"
    );
    let debug = dir.path().join("kubectl-soma.debug");
    assert!(debug_sections(&debug).contains(&".debug_line".to_owned()));
    let link = run(Command::new("readelf")
        .args(["--string-dump=.gnu_debuglink"])
        .arg(&bin));
    assert!(
        text(&link.stdout).contains("kubectl-soma.debug"),
        "no .gnu_debuglink naming kubectl-soma.debug: {}",
        text(&link.stdout)
    );

    // The stripped binary is the same program.
    let again = run(Command::new(&bin).arg("--version"));
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(again.stdout, version.stdout);

    // A crash address in it gives the source line through the debug file beside it, and only
    // through it.
    let nm = run(Command::new("nm").arg(&bin));
    let nm = text(&nm.stdout);
    let address = nm
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (addr, _kind, name) = (f.next()?, f.next()?, f.next()?);
            name.starts_with("_ZN12kubectl_soma4main17h")
                .then(|| format!("0x{addr}"))
        })
        .expect("no kubectl_soma::main symbol in the stripped binary");
    let (function, line) = symbolise(&bin, &address);
    assert_eq!(function, "kubectl_soma::main");
    assert!(
        line.contains("plugin/src/main.rs:") && !line.contains('?'),
        "no source line for kubectl_soma::main: {line}"
    );
    let debug_bytes = fs::read(&debug).unwrap();
    fs::rename(&debug, dir.path().join("elsewhere")).unwrap();
    let (_, line) = symbolise(&bin, &address);
    assert!(
        line.starts_with("??"),
        "source line without the debug file: {line}"
    );
    fs::rename(dir.path().join("elsewhere"), &debug).unwrap();

    // A second run refuses: it would replace the debug file with an empty one.
    let out = split(&[&bin]);
    assert!(!out.status.success(), "a second split succeeded");
    let err = text(&out.stderr);
    assert!(err.contains("has no debug info to keep apart"), "{err}");
    assert!(err.contains(&bin.display().to_string()), "{err}");
    assert_eq!(
        fs::read(&debug).unwrap(),
        debug_bytes,
        "the debug file changed"
    );
    assert_eq!(fs::metadata(&bin).unwrap().len(), after);
}

#[test]
fn a_panic_in_a_split_release_binary_still_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("crashes.rs");
    fs::write(
        &source,
        "#[inline(never)]\n\
         fn crash_here(n: usize) -> usize {\n\
         \x20   if n > 1 { panic!(\"crashed\") }\n\
         \x20   n\n\
         }\n\
         fn main() { println!(\"{}\", crash_here(std::env::args().count())); }\n",
    )
    .unwrap();
    let bin = dir.path().join("crashes");
    // What Cargo.toml's [profile.release] asks for: optimised, line tables.
    let out = run(Command::new("rustc")
        .args(["-O", "-C", "debuginfo=line-tables-only", "-o"])
        .arg(&bin)
        .arg(&source));
    assert!(out.status.success(), "rustc: {}", text(&out.stderr));

    let out = split(&[&bin]);
    assert!(
        out.status.success(),
        "split-debuginfo.sh failed: {}",
        text(&out.stderr)
    );
    assert_eq!(debug_sections(&bin), Vec::<String>::new());

    let out = run(Command::new(&bin).arg("crash").env("RUST_BACKTRACE", "1"));
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("crashes::crash_here"), "{err}");
    assert!(
        err.contains("crashes.rs:3:"),
        "no file:line in the backtrace: {err}"
    );
}

#[test]
fn split_debuginfo_refuses_what_is_not_an_elf_binary_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kubectl-soma");
    fs::write(&file, "#!/bin/sh\necho not a binary\n").unwrap();
    let out = split(&[&file]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("{}: not an ELF binary", file.display())),
        "{err}"
    );
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        "#!/bin/sh\necho not a binary\n"
    );
    assert!(!dir.path().join("kubectl-soma.debug").exists());

    let out = split(&[&dir.path().join("missing")]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("missing: no such file"));
}

/// The image's binaries are the split ones, and the debug info is a stage of its own.
#[test]
fn the_image_ships_binaries_without_debug_info() {
    let dockerfile = fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.split("\nFROM ").skip(1).collect();
    let build = stages
        .iter()
        .find(|s| s.contains(" AS build"))
        .expect("no build stage");
    let build = build.replace("\\\n", " ");
    let split_step = build
        .find("scripts/split-debuginfo.sh /out/bin/soma-agent /out/bin/kubectl-soma")
        .expect("the build stage does not split both binaries");
    let cargo = build
        .find("cargo build --release")
        .expect("no release build");
    assert!(cargo < split_step);

    let last = stages.last().unwrap();
    let copies: Vec<&str> = last
        .lines()
        .filter(|l| l.starts_with("COPY --from=build"))
        .collect();
    assert_eq!(
        copies,
        ["COPY --from=build /out/bin/soma-agent /out/bin/kubectl-soma /usr/local/bin/"]
    );
    let debug = stages
        .iter()
        .find(|s| s.starts_with("scratch AS debug"))
        .expect("no debug stage");
    assert!(debug.contains("COPY --from=build /out/debug/ /"));

    // The build context holds the script (.dockerignore leaves out the rest of scripts/).
    let ignore = fs::read_to_string(repo().join(".dockerignore")).unwrap();
    let lines: Vec<&str> = ignore.lines().collect();
    let excluded = lines.iter().position(|l| *l == "scripts/");
    let kept = lines
        .iter()
        .position(|l| *l == "!scripts/split-debuginfo.sh")
        .expect(".dockerignore drops scripts/split-debuginfo.sh");
    assert!(excluded.is_none_or(|e| e < kept));
}
