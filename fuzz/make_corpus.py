#!/usr/bin/env python3
"""Writes the seed corpora in fuzz/corpus/<target>/, the same bytes on every run.

A handful of valid inputs and edge cases per target; no key, PIN or other secret (the audit
seeds' signatures are placeholders: the verifier target re-signs checkpoints itself when its
flag byte asks). Client certificates for peer_identity_fuzz are made at run time by
fuzz/make_cert_seeds.sh. Usage: fuzz/make_corpus.py [OUT_DIR] (default fuzz/corpus).
"""
import base64
import hashlib
import json
import os
import shutil
import struct
import sys

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")


def write(target, name, data):
    folder = os.path.join(OUT, target)
    os.makedirs(folder, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def u32(n):
    return struct.pack(">I", n)


# --- ciphertext_blob_fuzz: core/ciphertext_blob.h --------------------------------------------
KEY_ID = bytes(range(0x10, 0x20))
IV = bytes(range(0xA0, 0xAC))
TAG = bytes([0x5A]) * 16


def blob(version, ciphertext, fmt=1):
    return bytes([fmt]) + KEY_ID + u32(version) + IV + ciphertext + TAG


write("ciphertext_blob", "empty_ciphertext", blob(1, b""))
write("ciphertext_blob", "data_key", blob(7, bytes(range(32))))
write("ciphertext_blob", "max_version", blob(0xFFFFFFFF, b"secret"))
write("ciphertext_blob", "unknown_format", blob(1, b"", fmt=2))
write("ciphertext_blob", "truncated", blob(1, b"")[:-1])
write("ciphertext_blob", "header_only", blob(1, b"")[:21])
write("ciphertext_blob", "longest", blob(1, bytes(4096)))  # kBlobMaxBytes; also raises max_len
write("ciphertext_blob", "too_long", blob(1, bytes(4097)))
write("ciphertext_blob", "key_id_text", "10111213-1415-4617-9819-1a1b1c1d1e1f")
write("ciphertext_blob", "key_id_upper", "10111213-1415-4617-9819-1A1B1C1D1E1F")
write("ciphertext_blob", "key_id_bad_dash", "10111213_1415-4617-9819-1a1b1c1d1e1f")

# --- encryption_context_fuzz: core/encryption_context.h --------------------------------------


def context(entries, count=None):
    out = u32(len(entries) if count is None else count)
    for key, value in entries:
        out += u32(len(key)) + key + u32(len(value)) + value
    return out


write("encryption_context", "empty", context([]))
write("encryption_context", "one", context([(b"table", b"patients")]))
write("encryption_context", "sorted", context([(b"app", b"emr"), (b"table", b"patients"),
                                               (b"tenant", b"\x00\xff")]))
write("encryption_context", "unsorted", context([(b"b", b"1"), (b"a", b"2")]))
write("encryption_context", "duplicate_key", context([(b"a", b"1"), (b"a", b"2")]))
write("encryption_context", "empty_key", context([(b"", b"value")]))
write("encryption_context", "long_key", context([(b"k" * 257, b"")]))
write("encryption_context", "too_many", context([(b"%02d" % i, b"") for i in range(65)]))
write("encryption_context", "too_large", context([(b"a", b"v" * 8192)]))
write("encryption_context", "trailing", context([(b"a", b"1")]) + b"\x00")
write("encryption_context", "count_too_high", context([(b"a", b"1")], count=0xFFFFFFFF))

# --- config_fuzz: server/config.h -------------------------------------------------------------
MINIMAL_CONFIG = """[tls]
cert = "/srv/custos/tls/server.pem"
key = "/srv/custos/tls/server.key"
client_ca = "/srv/custos/tls/ca.pem"

[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "custos"
pin_file = "/srv/custos/hsm.pin"

[storage]
path = "/srv/custos/custos.db"

[policy]
file = "/srv/custos/policy.toml"
"""
write("config", "minimal.toml", MINIMAL_CONFIG)
write("config", "full.toml", MINIMAL_CONFIG + """
[server]
listen = "127.0.0.1:7443"
worker_threads = 16
max_waiting_calls = 4096
rate_limit_per_peer = 100
rate_limit_per_principal = 50
max_message_bytes = 262144
maintenance_interval_seconds = 60
health_interval_ms = 1000
health_probe_timeout_ms = 2000

[dual_control]
default_approvals = 2
request_ttl_hours = 24
deletion_waiting_days = 30

[dual_control.approvals]
CreateKey = 1
RotateKey = 3

[keys]
encryption_limit = 4294967296
rotate_at_percent = 75
reservation_block = 10000

[audit]
checkpoint_interval_seconds = 60
checkpoint_every = 1000
verify_full_chain_at_start = true
context_hmac_cache = 0

[log]
level = "info"
audit_mirror = false
""")
write("config", "relative_paths.toml", """# paths resolve against the file's folder
[tls]
cert = "pki/server.crt"
key = 'pki/server.key'
client_ca = "pki/ca.crt"
crl_dir = "pki/crl"
max_connection_age_seconds = 86400
[hsm]
module = "/usr/lib/softhsm/libsofthsm2.so"
token_label = "custos \\u00e9"  # comment: caf\u00e9
pin_env = "CUSTOS_HSM_PIN"
key_cache = 1
[storage]
path = "custos.db"
[policy]
file = '''policy.toml'''
""")
write("config", "out_of_range.toml", MINIMAL_CONFIG + """
[server]
worker_threads = 0
[keys]
encryption_limit = 1e300
""")
write("config", "fails_open.toml", MINIMAL_CONFIG + """
[dual_control.approvals]
RotateKey = 0
""")
write("config", "syntax_error.toml", "[tls\ncert = \n")
write("config", "multiline_strings.toml", MINIMAL_CONFIG.replace(
    'token_label = "custos"', 'token_label = """\\\n    custos"""\nroot_key_label = """a""""'))
write("config", "inline_tables.toml", MINIMAL_CONFIG + """
dual_control = { request_ttl_hours = 1, approvals = { DisableKey = 2 } }
""")

# --- policy_fuzz: policy/policy.h --------------------------------------------------------------
write("policy", "example.toml", """# Custos policy
[roles]
app     = ["spiffe://hospital.example/app/emr", "spiffe://hospital.example/db/billing"]
officer = ["spiffe://hospital.example/officer/alice", "spiffe://hospital.example/officer/bob"]
auditor = ["spiffe://hospital.example/auditor/carol"]
""")
write("policy", "officer_only.toml", '[roles]\nofficer = ["officer1"]\n')
write("policy", "three_officers.toml",
      '[roles]\nofficer = ["urn:custos:o1", "o2", \'o3\']\napp = []\n')
write("policy", "two_roles.toml", '[roles]\nofficer = ["a"]\napp = ["a"]\n')
write("policy", "twice.toml", '[roles]\nofficer = ["a", "a"]\n')
write("policy", "unknown_role.toml", '[roles]\nofficer = ["a"]\nroot = ["b"]\n')
write("policy", "bad_principals.toml",
      '[roles]\nofficer = ["a b", " a", "x:", ":y", "1urn:z", "caf\u00e9"]\n')
write("policy", "not_a_table.toml", 'roles = 1\n')
write("policy", "comments.toml",
      '# r\u00f4les \u2014 caf\u00e9\n[roles] # trailing\nofficer = [ # open\n  "o1", # one\n]\n')
write("policy", "multiline.toml", '[roles]\nofficer = ["""\\\n  officer1"""]\n')
write("policy", "dotted.toml", 'roles.officer = ["o1"]\n"roles".app = [\'a1\']\n')

# --- audit_record_fuzz and audit_verify_fuzz: audit/record.h -----------------------------------
ZERO_HASH = bytes(32)
FIELDS_V1 = ["seq", "time", "principal", "role", "action", "key_id", "key_version",
             "source_key_id", "source_key_version", "request_id", "outcome", "peer",
             "context_hmac", "detail"]
FIELDS_V2 = FIELDS_V1 + ["call_id", "row", "row_digest"]


def canonical(record):
    fmt = record.get("format", 1)
    out = b"custos-audit-v1" if fmt == 1 else b"custos-audit-v2"
    for field in FIELDS_V1 if fmt == 1 else FIELDS_V2:
        value = record[field]
        value = str(value).encode() if isinstance(value, int) else value
        out += u32(len(value)) + value
    return out


def make_record(seq, fmt=2, **fields):
    record = {"seq": seq, "time": 1700000000 + seq, "principal": b"spiffe://custos.local/app/demo",
              "role": b"app", "action": b"GenerateDataKey",
              "key_id": b"10111213-1415-4617-9819-1a1b1c1d1e1f", "key_version": 1,
              "source_key_id": b"", "source_key_version": 0, "request_id": b"",
              "outcome": b"OK", "peer": b"ipv4:127.0.0.1:50000",
              "context_hmac": hashlib.sha256(b"context %d" % seq).hexdigest().encode(),
              "detail": b"", "format": fmt}
    if fmt == 2:
        record.update({"call_id": b"call-%d" % seq, "row": b"", "row_digest": b""})
    record.update(fields)
    return record


def chain(records):
    previous = ZERO_HASH
    for record in records:
        record["hash"] = hashlib.sha256(previous + canonical(record)).digest()
        previous = record["hash"]
    return records


def dumps(obj, **kwargs):
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), **kwargs)


def put_string(obj, name, value):
    try:
        obj[name] = value.decode("utf-8")
    except UnicodeDecodeError:
        obj[name] = value.decode("utf-8", errors="replace")
        obj[name + "_base64"] = base64.b64encode(value).decode()


def record_line(record):
    obj = {}
    for field in FIELDS_V1 if record["format"] == 1 else FIELDS_V2:
        if field == "call_id":
            obj["format"] = 2
        value = record[field]
        if isinstance(value, int):
            obj[field] = value
        else:
            put_string(obj, field, value)
    obj["hash"] = record["hash"].hex()
    return dumps(obj)


SIGNATURE = base64.b64encode(b"0\x06\x02\x01\x01\x02\x01\x01").decode()  # a placeholder


def checkpoint_object(seq, hash_, fmt=2, prev_seq=0, prev_hash=ZERO_HASH):
    obj = {"seq": seq, "hash": hash_.hex(), "time": 1700000100}
    message = "custos-audit-checkpoint-v%d\nseq=%d\nhash=%s\ntime=%d\n" % (
        fmt, seq, hash_.hex(), obj["time"])
    if fmt == 2:
        obj["prev_seq"] = prev_seq
        obj["prev_hash"] = prev_hash.hex()
        message += "prev_seq=%d\nprev_hash=%s\n" % (prev_seq, prev_hash.hex())
    obj["key_label"] = "custos-audit-signing"
    obj["message"] = message
    obj["signature"] = SIGNATURE
    return obj


def checkpoint_line(*args, **kwargs):
    return dumps({"checkpoint": checkpoint_object(*args, **kwargs)})


v2 = chain([make_record(1), make_record(2, detail=b"caf\xc3\xa9 \xff raw", key_version=2)])
v1 = chain([make_record(1, fmt=1, role=b"officer", action=b"CreateKey")])
write("audit_record", "record_v2", record_line(v2[0]))
write("audit_record", "record_base64", record_line(v2[1]))
write("audit_record", "record_v1", record_line(v1[0]))
write("audit_record", "record_v1_with_v2_field", record_line(v1[0])[:-1] + ',"row":""}')
write("audit_record", "duplicate_member", record_line(v2[0])[:-1] + ',"seq":9}')
write("audit_record", "negative_seq", record_line(v2[0]).replace('"seq":1', '"seq":-1'))
write("audit_record", "checkpoint_v2",
      json.dumps(checkpoint_object(2, v2[1]["hash"]), indent=2) + "\n")
write("audit_record", "checkpoint_v1",
      json.dumps(checkpoint_object(1, v1[0]["hash"], fmt=1), indent=2) + "\n")
write("audit_record", "checkpoint_line", checkpoint_line(2, v2[1]["hash"]))
write("audit_record", "hex", v2[0]["hash"].hex())


def export(flags, lines):
    return bytes([flags]) + ("\n".join(lines) + "\n").encode()


log = chain([make_record(seq) for seq in range(1, 5)])
lines = [record_line(r) for r in log]
cp2 = checkpoint_line(2, log[1]["hash"])
cp4 = checkpoint_line(4, log[3]["hash"], prev_seq=2, prev_hash=log[1]["hash"])
with_checkpoints = lines[:2] + [cp2] + lines[2:] + [cp4]
write("audit_verify", "as_is", export(0x00, lines))
write("audit_verify", "as_is_checkpoints", export(0x00, with_checkpoints))
write("audit_verify", "signed", export(0x02, with_checkpoints))
write("audit_verify", "signed_anchor", export(0x0A, with_checkpoints))
write("audit_verify", "rehashed", export(0x0F, with_checkpoints))
write("audit_verify", "resealed_gap", export(0x01, lines[:1] + lines[2:]))
write("audit_verify", "resealed_swap", export(0x07, [lines[1], lines[0]] + lines[2:] + [cp4]))
write("audit_verify", "truncated_tail", export(0x0E, lines[:2] + [cp2, cp4]))
mixed = chain([make_record(1, fmt=1), make_record(2), make_record(3, fmt=1)])
write("audit_verify", "format_back", export(0x01, [record_line(r) for r in mixed]))
write("audit_verify", "blank_and_bad_lines", export(0x00, [lines[0], "", "  \t", "{", lines[1]]))
write("audit_verify", "empty_with_anchor", export(0x0A, [cp2]))

# --- peer_identity_fuzz: server/peer_identity.h -----------------------------------------------
# Real certificates come from fuzz/make_cert_seeds.sh at run time; these are the edge cases.
write("peer_identity", "empty_pem", "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
write("peer_identity", "bad_base64", "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
write("peer_identity", "der_truncated", b"\x30\x82\x01\x00\x30\x81")
write("peer_identity", "der_empty_sequence", b"\x30\x00")
