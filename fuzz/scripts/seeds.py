#!/usr/bin/env python3
"""Writes the seed corpus (fuzz/corpus/<target>/seed-*): valid examples of each input and a few
hostile ones. Run from anywhere; it replaces only the seed-* files, so what fuzzing added and
`cargo fuzz cmin` kept stays."""

import io
import json
import os
import struct
import tarfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "corpus")
PREFIX = "wal/7312345678901234567/"
SHA = "5" * 64
ID = "20261124T120000Z-pg-appdb-7f3a"


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def clear_seeds():
    for target in os.listdir(ROOT) if os.path.isdir(ROOT) else []:
        for f in os.listdir(os.path.join(ROOT, target)):
            if f.startswith("seed-"):
                os.remove(os.path.join(ROOT, target, f))


def backup_ids():
    for name, s in {
        "pg": ID,
        "qd": "20270101T000000Z-qd-docs-0001",
        "set": "20261231T235959Z-set-all-ffff",
        "unknown-engine": "20261124T120000Z-zz-appdb-7f3a",
        "latest": "latest",
        "climb": "20261124T120000Z-pg-../x",
        "slash": "20261124T120000Z-pg-appdb-7f3a/",
        "multibyte": "2026112\u00e9120000Z-pg-appdb-7f3a",
        "trailing-dash": "20261124T120000Z-pg-appdb-",
        "json": json.dumps(ID),
        "long": "20261124T120000Z-pg-" + "a" * 90,
    }.items():
        write("backup_id", name, s)
    # Time, engine, then a target name: the id the agent makes from them.
    write("backup_id", "new-now", struct.pack("<qB", 1_795_000_000, 0) + "App_DB/../etc".encode())
    write("backup_id", "new-year-9999", struct.pack("<qB", 253_402_300_799, 2) + "\u00c4\u00d6---x".encode())
    write("backup_id", "new-negative", struct.pack("<qB", -(2**63), 1) + b"")


def wal_names():
    for name, s in {
        "segment": "00000002000000010000003F",
        "segment-lower": "00000002000000010000003f",
        "segment-max": "FFFFFFFFFFFFFFFFFFFFFFFF",
        "history": "00000003.history",
        "partial-name": "000000010000000000000001.partial",
        "straddling": "0000000\u00e9000000000000003",
        "plus": "+0000001.history",
        "key-seg": f"{PREFIX}000000010000000000000003.seg.1000000.1700000000000.{SHA}.zst",
        "key-partial": f"000000010000000000000004.partial.4000.1700000000001.{SHA}.zst",
        "key-history": f"{PREFIX}00000002.history.3c.1700000000002.{SHA}.zst",
        "key-long-end": f"000000010000000000000003.seg.ffffffffffffffff.1.{SHA}.zst",
        "key-last": f"FFFFFFFFFFFFFFFF000000FF.seg.ffffff.1.{SHA}.zst",
        "key-negative-ms": f"000000010000000000000003.seg.100.-1.{SHA}.zst",
        "key-huge-ms": f"000000010000000000000003.seg.100.999999999999999999.{SHA}.zst",
        "key-wrong-kind": f"00000002.history.seg.100.1.{SHA}.zst",
    }.items():
        write("wal_name", name, s)
    write("wal_name", "numbers", struct.pack("<IQB", 1, 0x1_0000_0003, 4))
    write("wal_name", "numbers-max", struct.pack("<IQB", 0xFFFFFFFF, 2**64 - 1, 10))


HISTORY = "1\t0/3000060\tno recovery target specified\n\n# comment\n2\t0/5000000\tbefore 2026-01-01 00:00:00+00\n"


def histories():
    write("history", "postgres", HISTORY)
    write("history", "crlf", HISTORY.replace("\n", "\r\n"))
    write("history", "one", "1\t16/B374D848\tat restore point \"x\"\n")
    write("history", "empty", "")
    for name, s in {
        "bad-tli": "x 0/1 r\n",
        "bad-lsn": "1 0/ r\n",
        "tli-only": "1\n",
        "huge-tli": "99999999999 0/1 r\n",
        "huge-lsn": "1 123456789/0 r\n",
        "plus": "+1 +0/1 r\n",
    }.items():
        write("history", name, s)


def artifact(name, fmt, **extra):
    a = {
        "name": name,
        "format": fmt,
        "raw_bytes": 123456,
        "stored_bytes": 23456,
        "raw_sha256": "a" * 64,
        "stored_sha256": "b" * 64,
        "compression": {"algorithm": "zstd", "level": 3, "threads": 2},
        "part_size": 16777216,
        "max_part_size": 23456,
        "parts": 1,
    }
    a.update(extra)
    return a


def manifest(id_, engine, kind, artifacts, details=None, **extra):
    m = {
        "manifest_version": 1,
        "id": id_,
        "engine": engine,
        "kind": kind,
        "target": {"name": "appdb", "server": "db:5432", "server_version": "16.4"},
        "tool": {"name": "pg_dump", "version": "16.4"},
        "agent_version": "0.1.0",
        "started_at": "2026-11-24T12:00:00.123456789Z",
        "completed_at": "2026-11-24T12:00:05Z",
        "raw_bytes": sum(a["raw_bytes"] for a in artifacts),
        "stored_bytes": sum(a["stored_bytes"] for a in artifacts),
        "artifacts": artifacts,
    }
    if details is not None:
        m["details"] = details
    m.update(extra)
    return m


def manifests():
    logical = manifest(
        ID,
        "postgres",
        "logical",
        [artifact("globals.json.zst", "soma/globals+json"), artifact("dump.pgdump.zst", "pg_dump/custom", database="appdb")],
        {
            "globals": {"artifact": "globals.json.zst", "passwords": False, "roles": ["app"]},
            "databases": [
                {
                    "artifact": "dump.pgdump.zst",
                    "name": "appdb",
                    "owner": "app",
                    "roles": ["app"],
                    "tables": [{"schema": "public", "table": "t", "rows": 3, "checksum": "123"}],
                }
            ],
        },
    )
    physical_id = "20261124T130000Z-pg-cluster-0a0b"
    physical = manifest(
        physical_id,
        "postgres",
        "physical",
        [artifact("base.tar.zst", "pg_basebackup/tar")],
        {
            "system_id": "7312345678901234567",
            "timeline": 1,
            "start_lsn": "0/2000028",
            "stop_lsn": "0/2000100",
            "stop_time": "2026-11-24T13:00:09Z",
            "wal_segment_size": 16777216,
        },
        encryption={"algorithm": "aes-256-gcm-stream", "key_fingerprint": "0123456789abcdef"},
    )
    qdrant = manifest(
        "20261124T140000Z-qd-docs-1234",
        "qdrant",
        "collection-snapshots",
        [artifact("docs.snapshot.zst", "qdrant/snapshot", collection="docs", shard=0)],
        {"qdrant_version": "1.12.0", "collections": {"docs": {"vectors": {"size": 384, "distance": "Cosine"}, "hnsw": {"ef": 0.5}}}},
    )
    qdrant["tool"] = {"name": "qdrant", "version": "1.12.0"}
    set_ = manifest("20261124T115959Z-set-all-9999", "set", "set", [], members=[ID, "20261124T140000Z-qd-docs-1234"])
    write("manifest", "logical", json.dumps(logical, indent=2))
    write("manifest", "physical", json.dumps(physical, indent=2))
    write("manifest", "qdrant", json.dumps(qdrant))
    write("manifest", "set", json.dumps(set_, indent=2))
    newer = dict(logical, manifest_version=2)
    write("manifest", "newer-version", json.dumps(newer))
    bad_physical = json.loads(json.dumps(physical))
    bad_physical["details"]["wal_segment_size"] = 0
    bad_physical["details"]["system_id"] = "../backups"
    write("manifest", "physical-bad-details", json.dumps(bad_physical))
    write("manifest", "bad-id", json.dumps(dict(logical, id="../../etc/passwd")))
    write("manifest", "truncated", json.dumps(logical)[:300])
    write("manifest", "deep", "[" * 200 + "]" * 200)
    write("manifest", "not-json", b"\x00\xff\xfe{")


def key(file, kind, end, ms=1_700_000_000_000, sha=SHA):
    return f"{PREFIX}{file}.{kind}.{end:x}.{ms}.{sha}.zst"


def seg(tli, segno):
    return f"{tli:08X}{segno >> 8:08X}{segno & 0xFF:08X}"


def listings():
    full = 1 << 24
    lines = ["24 1 0/2000028 0/2000100", f"backups/{ID}/manifest.json", f"backups/{ID}/dump.pgdump.zst", "backups/latest/manifest.json"]
    lines += [key(seg(1, s), "seg", full) for s in range(2, 6)]
    lines += [key(seg(1, 6), "partial", 0x4000), key(seg(1, 6), "partial", 0x8000)]
    write("store_listing", "contiguous", "\n".join(lines) + "\n")
    gap = ["24 1 0/2000028 0/2000100"] + [key(seg(1, s), "seg", full) for s in (2, 3, 5, 6)]
    write("store_listing", "gap", "\n".join(gap) + "\n")
    # Timeline 2 branched from 1 inside segment 4; timeline 3 from 2 in segment 5.
    tl = ["24 1 0/3000000 0/3000100"]
    tl += [key(seg(1, s), "seg", full) for s in (3,)] + [key(seg(1, 4), "partial", 0x8000)]
    tl += [key(seg(2, 4), "seg", full), key(seg(2, 5), "partial", 0x2000), key(seg(3, 5), "seg", full)]
    tl += [key("00000002.history", "history", 0x2A), key("00000003.history", "history", 0x54)]
    tl += ["H 2 1\t0/4006000\tno recovery target specified", "H 3 1\t0/4006000\tx", "H 3 2\t0/5001000\ty"]
    write("store_listing", "timelines", "\n".join(tl) + "\n")
    hostile = ["30 4294967295 FFFFFFFF/FFFFFFFF FFFFFFFF/FFFFFFFF"]
    hostile += [key("00000001FFFFFFFF000000FF", "seg", 0xFFFFFF), key(seg(1, 3), "seg", 0xFFFFFFFFFF)]
    hostile += [key("FFFFFFFF.history", "history", 1), "H 4294967295 4294967295 FFFFFFFF/FFFFFFFF r"]
    hostile += ["backups//manifest.json", "backups/x/manifest.json/", "wal/other/" + seg(1, 3) + ".seg.0.0.abc.zst"]
    write("store_listing", "hostile", "\n".join(hostile) + "\n")
    write("store_listing", "bad-history", "24 2 0/0 0/0\n" + key("00000002.history", "history", 8) + "\nH 2 x 0/1 r\n")


def tar_bytes(entries, fmt=tarfile.USTAR_FORMAT):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.type = e.get("type", tarfile.REGTYPE)
            info.mode = e.get("mode", 0o600)
            info.mtime = 1_700_000_000
            info.linkname = e.get("link", "")
            data = e.get("data", b"")
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)
    return buf.getvalue()


def untars():
    d, f, l = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    pgdata = [
        {"name": "base", "type": d, "mode": 0o700},
        {"name": "base/1", "type": d, "mode": 0o750},
        {"name": "base/1/1259", "data": b"heap" * 8},
        {"name": "PG_VERSION", "mode": 0o640, "data": b"16\n"},
        {"name": "pg_wal", "type": l, "link": "/mnt/wal"},
        {"name": "pg_tblspc", "type": d},
        {"name": "pg_tblspc/16384", "type": l, "link": "/mnt/ts"},
        {"name": "global/pg_control", "data": b"\x01" * 64},
    ]
    write("untar", "pgdata", tar_bytes(pgdata))
    write("untar", "modes", tar_bytes([{"name": "tool", "mode": 0o4755, "data": b"#!/bin/sh\n"}, {"name": "sticky", "type": d, "mode": 0o1777}]))
    for name, entries in {
        "climb": [{"name": "../outside", "data": b"x"}],
        "climb-deep": [{"name": "base/../../outside", "data": b"x"}],
        "absolute": [{"name": "/tmp/soma-fuzz-abs", "data": b"x"}],
        "symlink-out": [{"name": "recovery.signal", "type": l, "link": "../outside"}],
        "through-link": [{"name": "pg_wal", "type": l, "link": ".."}, {"name": "pg_wal/outside", "data": b"x"}],
        "file-over-link": [{"name": "pg_wal", "type": l, "link": "../outside"}, {"name": "pg_wal", "data": b"x"}],
        "hardlink": [{"name": "global/x", "type": tarfile.LNKTYPE, "link": "../outside"}],
        "char-device": [{"name": "null", "type": tarfile.CHRTYPE}],
        "fifo": [{"name": "fifo", "type": tarfile.FIFOTYPE}],
        "deep": [{"name": "a/" * 40 + "f", "data": b"x"}],
        "duplicate": [{"name": "a", "data": b"1"}, {"name": "a", "data": b"2"}],
    }.items():
        write("untar", name, tar_bytes(entries))
    write("untar", "gnu-long-name", tar_bytes([{"name": "x" * 150, "data": b"x"}], tarfile.GNU_FORMAT))
    write("untar", "pax", tar_bytes([{"name": "p\u00e9" * 80, "data": b"x"}], tarfile.PAX_FORMAT))
    whole = tar_bytes([{"name": "a", "data": b"7" * 4096}])
    write("untar", "cut", whole[: 512 + 1000])
    write("untar", "padded", whole + b"\0" * 10240)


if __name__ == "__main__":
    clear_seeds()
    backup_ids()
    wal_names()
    histories()
    manifests()
    listings()
    untars()
