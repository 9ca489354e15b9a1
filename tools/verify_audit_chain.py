#!/usr/bin/python3
"""Recomputes every hash of Custos audit log files with Python's standard library alone.

    verify_audit_chain.py FILE [FILE ...]

FILEs are JSON Lines from `custosctl audit export` or archive files (audit-*.jsonl), given
oldest first: they are checked as one log. A log whose older records were archived starts
just after a signed checkpoint, which the file holds as a checkpoint line; the chain goes on
from that checkpoint's hash. Every checkpoint line's hash must equal the record's at its seq.
A log that starts late must hold the ArchiveAuditLog record saying so, with a checkpoint
after it. Signatures are not checked here: verify each checkpoint that matters with openssl
(docs/AUDIT.md, "Verifying a checkpoint by hand"). Exit 0 if the chain holds, 1 if not.
"""
import base64
import hashlib
import json
import struct
import sys

FIELDS = {1: ["seq", "time", "principal", "role", "action", "key_id", "key_version",
              "source_key_id", "source_key_version", "request_id", "outcome", "peer",
              "context_hmac", "detail"]}
FIELDS[2] = FIELDS[1] + ["call_id", "row", "row_digest"]
MAGIC = {1: b"custos-audit-v1", 2: b"custos-audit-v2"}


def members(pairs):  # a member given twice has two readings
    assert len({k for k, _ in pairs}) == len(pairs), "a member appears twice"
    return dict(pairs)


def field_bytes(r, name):
    v = r.get(name)
    if name + "_base64" not in r:
        return str(v).encode() if isinstance(v, int) else v.encode("utf-8")
    b = base64.b64decode(r[name + "_base64"], validate=True)  # exact bytes, not UTF-8
    text = b.decode("utf-8", "replace")  # U+FFFD for bad bytes, as the exporter writes
    assert text.encode() != b and v in (None, text), f"{name}: two readings"
    return b


def lines(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line, object_pairs_hook=members)


def main(paths):
    signed = {}  # seq -> hash hex, from every file's checkpoint lines
    for path in paths:
        for r in lines(path):
            if "checkpoint" in r:
                c = r["checkpoint"]
                assert signed.get(c["seq"], c["hash"]) == c["hash"], f"two checkpoints at {c['seq']}"
                signed[c["seq"]] = c["hash"]
    prev, first, expected, fmt = None, None, None, 1
    statement, stated_at = None, None  # the archival record a log that starts late must hold
    for path in paths:
        for r in lines(path):
            if "checkpoint" in r:
                continue
            if first is None:  # record 1, or the record after the checkpoint it starts from
                first = expected = r["seq"]
                if first == 1:
                    prev = bytes(32)
                else:
                    assert first - 1 in signed, \
                        f"the log starts at {first} and holds no checkpoint at {first - 1}"
                    prev = bytes.fromhex(signed[first - 1])
                    statement = (f"; the live log starts after the checkpoint at {first - 1} "
                                 f"(hash {signed[first - 1]})")
            assert r["seq"] == expected, f"expected record {expected}, found {r['seq']}"
            f = r.get("format", 1)
            extra = {k.removesuffix("_base64") for k in r} & set(FIELDS[2][14:])
            assert f in (1, 2) and f >= fmt and (f == 2 or not extra), f"record {expected}: format"
            canonical = MAGIC[f] + b"".join(
                struct.pack(">I", len(b)) + b for b in (field_bytes(r, n) for n in FIELDS[f]))
            h = hashlib.sha256(prev + canonical).hexdigest()
            assert h == r["hash"], f"record {expected}: hash does not match"
            assert signed.get(expected, h) == h, f"record {expected}: differs from its checkpoint"
            if (statement and stated_at is None and r["action"] == "ArchiveAuditLog"
                    and r["detail"].endswith(statement)):
                stated_at = expected
            prev, expected, fmt = bytes.fromhex(h), expected + 1, f
    assert first is not None, "no record"
    assert max(signed, default=0) < expected, f"a checkpoint at {max(signed)} is past the end"
    # A log cut at a checkpoint looks archived there; the archival's own record says it was.
    assert not statement or (stated_at and any(stated_at <= s < expected for s in signed)), \
        f"the log starts after {first - 1} but no ArchiveAuditLog record followed by a " \
        f"checkpoint says it was archived up to there (cut off?)"
    start = "" if first == 1 else f" (after the checkpoint at {first - 1}, named by record {stated_at})"
    print(f"chain OK: records {first} to {expected - 1}{start}, last hash {prev.hex()}")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except AssertionError as e:
        print(f"FAILED: {e}")
        sys.exit(1)
