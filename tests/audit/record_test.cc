// The frozen canonical encoding, the chain and the checkpoint message.
#include "audit/record.h"

#include <catch2/catch.hpp>
#include <random>
#include <set>

#include "tests/audit/audit_test_util.h"

namespace custos::audit {
namespace {

using test::VectorRecord;

// Parses a canonical encoding back into its fields: if this always recovers the fields, no
// two different records can encode equal.
std::vector<std::string> DecodeCanonical(const Bytes& bytes) {
  const std::string text(bytes.begin(), bytes.end());
  REQUIRE((text.substr(0, kCanonicalMagic.size()) == kCanonicalMagic ||
           text.substr(0, kCanonicalMagicV2.size()) == kCanonicalMagicV2));
  std::vector<std::string> fields;
  size_t at = kCanonicalMagic.size();
  while (at < text.size()) {
    REQUIRE(text.size() - at >= 4);
    uint32_t size = 0;
    for (int i = 0; i < 4; ++i) size = size << 8 | static_cast<uint8_t>(text[at + i]);
    at += 4;
    REQUIRE(text.size() - at >= size);
    fields.push_back(text.substr(at, size));
    at += size;
  }
  return fields;
}

std::vector<std::string> FieldsOf(const Record& r) {
  return {std::to_string(r.seq),
          std::to_string(r.time),
          r.principal,
          r.role,
          r.action,
          r.key_id,
          std::to_string(r.key_version),
          r.source_key_id,
          std::to_string(r.source_key_version),
          r.request_id,
          r.outcome,
          r.peer,
          r.context_hmac,
          r.detail};
}

std::vector<std::string> FieldsOfV2(const Record& r) {
  std::vector<std::string> fields = FieldsOf(r);
  fields.insert(fields.end(), {r.call_id, r.row, r.row_digest});
  return fields;
}

TEST_CASE("Canonical encoding matches the frozen test vector", "[record]") {
  const Bytes canonical = Canonical(VectorRecord());
  CHECK(ToHex(canonical) ==
        "637573746f732d61756469742d7631"  // "custos-audit-v1"
        "00000001"
        "31"  // seq "1"
        "0000000a"
        "31373030303030303030"  // time "1700000000"
        "00000005"
        "616c696365"  // principal "alice"
        "00000003"
        "617070"  // role "app"
        "00000007"
        "456e6372797074"  // action "Encrypt"
        "00000002"
        "6b31"  // key_id "k1"
        "00000001"
        "31"        // key_version "1"
        "00000000"  // source_key_id ""
        "00000001"
        "30"        // source_key_version "0"
        "00000000"  // request_id ""
        "00000002"
        "4f4b"  // outcome "OK"
        "0000000d"
        "31302e302e302e353a34373131"  // peer "10.0.0.5:4711"
        "00000000"                    // context_hmac ""
        "00000000");                  // detail ""
  CHECK(canonical.size() == 116);

  Record sealed = VectorRecord();
  Chain chain;
  chain.Seal(sealed);
  CHECK(sealed.seq == 1);
  CHECK(ToHex(sealed.hash) == "6e7d92b8a0af5c5c38eeca592a915670bfd7f1866f64236272e5d725778ba88d");
  CHECK(ChainHash(Bytes(32, 0), VectorRecord()) == sealed.hash);
}

TEST_CASE("Format 2 encodes three more fields under its own magic", "[record]") {
  Record record = VectorRecord();
  record.format = 2;
  record.call_id = "c7";
  record.row = "key:k1";
  record.row_digest = "ab";
  CHECK(ToHex(Canonical(record)) ==
        "637573746f732d61756469742d7632"  // "custos-audit-v2"
        "00000001"
        "31"
        "0000000a"
        "31373030303030303030"
        "00000005"
        "616c696365"
        "00000003"
        "617070"
        "00000007"
        "456e6372797074"
        "00000002"
        "6b31"
        "00000001"
        "31"
        "00000000"
        "00000001"
        "30"
        "00000000"
        "00000002"
        "4f4b"
        "0000000d"
        "31302e302e302e353a34373131"
        "00000000"
        "00000000"
        "00000002"
        "6337"  // call_id "c7"
        "00000006"
        "6b65793a6b31"  // row "key:k1"
        "00000002"
        "6162");  // row_digest "ab"
  // The same fields in format 1 (which has none of the three) encode differently, and a
  // format 1 record ignores them: the verifier refuses such a record.
  Record v1 = record;
  v1.format = 1;
  CHECK(Canonical(v1) == Canonical(VectorRecord()));
  CHECK(Canonical(v1) != Canonical(record));
  CHECK(DecodeCanonical(Canonical(record)) == FieldsOfV2(record));
}

TEST_CASE("Canonical encoding ignores the hash and decodes back to every field", "[record]") {
  Record record = test::SampleRecord(6);
  record.seq = 6;
  const Bytes canonical = Canonical(record);
  CHECK(DecodeCanonical(canonical) == FieldsOfV2(record));
  record.hash = Bytes(32, 0xab);
  CHECK(Canonical(record) == canonical);
  record.time = -5;
  CHECK(DecodeCanonical(Canonical(record))[1] == "-5");
}

TEST_CASE("No two different records encode equal", "[record]") {
  // Bytes shifted from one field into its neighbour.
  Record a;
  a.principal = "ab";
  a.role = "c";
  Record b;
  b.principal = "a";
  b.role = "bc";
  CHECK(Canonical(a) != Canonical(b));
  Record c;
  c.key_id = "k1";
  c.key_version = 1;  // "k1" "1"
  Record d;
  d.key_id = "k";
  d.key_version = 11;  // "k" "11"
  CHECK(Canonical(c) != Canonical(d));
  Record e;
  e.detail = std::string("\0\0\0\0", 4);  // looks like an empty length field
  Record f;
  f.context_hmac = std::string("\0\0\0\0", 4);
  CHECK(Canonical(e) != Canonical(f));

  // Random records over a tiny alphabet (many near-collisions): the encoding decodes back to
  // the fields, and distinct records give distinct encodings.
  std::mt19937 rng(42);
  auto text = [&rng] {
    std::string s(rng() % 4, 'x');
    for (char& ch : s) ch = "a1\0\x01"[rng() % 4];
    return s;
  };
  std::set<Bytes> seen;
  std::set<std::vector<std::string>> records;
  for (int i = 0; i < 5000; ++i) {
    Record r;
    r.seq = rng() % 12;
    r.time = static_cast<int64_t>(rng() % 12) - 2;
    r.principal = text(), r.role = text(), r.action = text(), r.key_id = text();
    r.key_version = rng() % 12;
    r.source_key_id = text();
    r.source_key_version = rng() % 12;
    r.request_id = text(), r.outcome = text(), r.peer = text(), r.context_hmac = text();
    r.detail = text();
    r.call_id = text(), r.row = text(), r.row_digest = text();
    const Bytes canonical = Canonical(r);
    REQUIRE(DecodeCanonical(canonical) == FieldsOfV2(r));
    CHECK(seen.insert(canonical).second == records.insert(FieldsOfV2(r)).second);
  }
}

TEST_CASE("A record is built from its event", "[record]") {
  Event event;
  event.time = 1700000123;
  event.principal = "spiffe://t/app/a";
  event.role = "app";
  event.action = "ReEncrypt";
  event.key_id = "k2";
  event.key_version = 3;
  event.source_key_id = "k1";
  event.source_key_version = 2;
  event.request_id = "r1";
  event.outcome = absl::StatusCode::kPermissionDenied;
  event.peer = "ipv4:127.0.0.1:1";
  event.detail = "grant missing";
  event.context_hmac = std::string(64, 'a');
  const Record record = RecordFromEvent(event, 7);
  CHECK(FieldsOf(record) == std::vector<std::string>{"7", "1700000123", "spiffe://t/app/a", "app",
                                                     "ReEncrypt", "k2", "3", "k1", "2", "r1",
                                                     "PERMISSION_DENIED", "ipv4:127.0.0.1:1",
                                                     std::string(64, 'a'), "grant missing"});
  CHECK(record.hash.empty());
}

TEST_CASE("A chain seals records in order, from seq 1 and 32 zero bytes", "[record]") {
  Chain chain;
  CHECK(chain.last_seq() == 0);
  CHECK(chain.last_hash() == Bytes(32, 0));
  Bytes prev(32, 0);
  for (int n = 1; n <= 5; ++n) {
    Record record = test::SampleRecord(n);
    chain.Seal(record);
    CHECK(record.seq == static_cast<uint64_t>(n));
    CHECK(record.hash == ChainHash(prev, record));
    CHECK(chain.last_seq() == record.seq);
    CHECK(chain.last_hash() == record.hash);
    prev = record.hash;
  }
}

TEST_CASE("A resumed chain continues where the log ends", "[record]") {
  const std::vector<Record> log = test::SealedLog(10);
  absl::StatusOr<Chain> resumed = Chain::Resume(9, log[8].hash);
  REQUIRE(resumed.ok());
  Record tenth = test::SampleRecord(10);
  resumed->Seal(tenth);
  CHECK(tenth == log[9]);

  CHECK(Chain::Resume(0, Bytes(32, 0)).ok());
  CHECK(Chain::Resume(0, Bytes(32, 1)).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(Chain::Resume(3, Bytes(31, 0)).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("The checkpoint message is exact text, in both formats", "[record]") {
  Checkpoint checkpoint;
  checkpoint.seq = 120;
  checkpoint.hash.resize(32);
  for (size_t i = 0; i < 32; ++i) checkpoint.hash[i] = static_cast<uint8_t>(i);
  checkpoint.time = 1800000000;
  checkpoint.prev_seq = 100;
  checkpoint.prev_hash = Bytes(32, 0xab);
  CHECK(CheckpointMessage(checkpoint) ==
        "custos-audit-checkpoint-v2\n"
        "seq=120\n"
        "hash=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
        "time=1800000000\n"
        "prev_seq=100\n"
        "prev_hash=abababababababababababababababababababababababababababababababab\n");
  checkpoint.format = 1;  // as signed before checkpoints named their predecessor
  CHECK(CheckpointMessage(checkpoint) ==
        "custos-audit-checkpoint-v1\n"
        "seq=120\n"
        "hash=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
        "time=1800000000\n");
}

TEST_CASE("Hex is lower-case and parsed strictly", "[record]") {
  CHECK(ToHex(Bytes{0x00, 0xab, 0xff}) == "00abff");
  CHECK(*FromHex("00abff") == Bytes{0x00, 0xab, 0xff});
  CHECK(FromHex("")->empty());
  CHECK_FALSE(FromHex("00ABFF").ok());
  CHECK_FALSE(FromHex("0").ok());
  CHECK_FALSE(FromHex("0g").ok());
  CHECK_FALSE(FromHex(" 00").ok());
}

}  // namespace
}  // namespace custos::audit
