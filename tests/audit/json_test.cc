// JSON Lines export of records and the JSON form of a checkpoint: exact round trips, strict
// parsing.
#include <catch2/catch.hpp>

#include "audit/record.h"
#include "tests/audit/audit_test_util.h"

namespace custos::audit {
namespace {

using test::VectorRecord;

using namespace std::string_literals;

absl::StatusCode CodeOf(std::string_view line) { return FromJsonLine(line).status().code(); }

TEST_CASE("A record exports as one JSON line with every field and its hash", "[json]") {
  Record record = VectorRecord();
  record.hash = Bytes(32, 0xab);
  CHECK(
      ToJsonLine(record) ==
      R"({"seq":1,"time":1700000000,"principal":"alice","role":"app","action":"Encrypt",)"
      R"("key_id":"k1","key_version":1,"source_key_id":"","source_key_version":0,)"
      R"("request_id":"","outcome":"OK","peer":"10.0.0.5:4711","context_hmac":"",)"
      R"("detail":"","hash":"abababababababababababababababababababababababababababababababab"})");
  // Format 2 says so, and carries its three fields before the hash.
  record.format = 2;
  record.call_id = "c7";
  record.row = "key:k1";
  record.row_digest = "ab";
  CHECK(ToJsonLine(record) ==
        R"({"seq":1,"time":1700000000,"principal":"alice","role":"app","action":"Encrypt",)"
        R"("key_id":"k1","key_version":1,"source_key_id":"","source_key_version":0,)"
        R"("request_id":"","outcome":"OK","peer":"10.0.0.5:4711","context_hmac":"",)"
        R"("detail":"","format":2,"call_id":"c7","row":"key:k1","row_digest":"ab",)"
        R"("hash":"abababababababababababababababababababababababababababababababab"})");
  CHECK(*FromJsonLine(ToJsonLine(record)) == record);
}

TEST_CASE("A JSON line has one reading: _base64 only for bytes that are not UTF-8", "[json]") {
  Record record = test::SealedLog(1)[0];
  record.principal = "CN=\xff evil"s;
  const std::string line = ToJsonLine(record);
  REQUIRE(FromJsonLine(line).ok());
  // An edited plain member beside the exact bytes: a SIEM would show one, the verifier check
  // the other.
  std::string edited = line;
  const size_t at = edited.find("evil");
  edited.replace(at, 4, "good");
  CHECK(FromJsonLine(edited).status().code() == absl::StatusCode::kInvalidArgument);
  CHECK_THAT(std::string(FromJsonLine(edited).status().message()),
             Catch::Contains("principal and principal_base64 disagree"));
  // _base64 for text that is valid UTF-8 (so the plain member could carry it): refused.
  Record plain = test::SealedLog(1)[0];
  std::string doubled = ToJsonLine(plain);
  doubled.insert(doubled.find("\"role\""), R"("principal_base64":"bWFsbG9yeQ==",)");
  CHECK_THAT(std::string(FromJsonLine(doubled).status().message()),
             Catch::Contains("principal_base64 holds valid UTF-8"));
  // Without the plain member, the exact bytes alone are fine.
  std::string bare = line;
  const size_t from = bare.find(R"("principal":)");
  const size_t to = bare.find(R"("principal_base64")");
  bare.erase(from, to - from);
  absl::StatusOr<Record> back = FromJsonLine(bare);
  REQUIRE(back.ok());
  CHECK(back->principal == record.principal);
  // A member given twice: a parser keeps the last, a SIEM may show the first. Refused, for
  // records and checkpoint lines alike.
  std::string twice = ToJsonLine(plain);
  twice.insert(twice.find("\"role\""), R"("principal":"mallory",)");
  CHECK(FromJsonLine(twice).status() ==
        absl::InvalidArgumentError(
            "member \"principal\" appears twice (a line must have one reading)"));
  CHECK(absl::IsInvalidArgument(
      CheckpointFromJsonLine(R"({"checkpoint":{"seq":1,"seq":2}})").status()));
}

TEST_CASE("JSON lines round-trip every record exactly", "[json]") {
  for (const Record& record : test::SealedLog(50)) {
    const std::string line = ToJsonLine(record);
    CHECK(line.find('\n') == std::string::npos);
    absl::StatusOr<Record> back = FromJsonLine(line);
    REQUIRE(back.ok());
    CHECK(*back == record);
  }
}

TEST_CASE("JSON lines keep awkward bytes exactly", "[json]") {
  Record record = test::SealedLog(1)[0];
  record.principal = "CN=\xff\xfe evil\n{\"seq\":9}"s;  // not UTF-8, a newline
  record.detail = "nul\0quote\"back\\slash\x01 \xc3\xa9t\xc3\xa9"s;
  record.peer = "\xed\xa0\x80";  // an encoded surrogate: not UTF-8 either
  record.time = -1;
  record.seq = UINT64_MAX;
  record.key_version = UINT32_MAX;
  const std::string line = ToJsonLine(record);
  CHECK(line.find('\n') == std::string::npos);
  CHECK(line.find("\"principal_base64\"") != std::string::npos);
  CHECK(line.find("\"peer_base64\"") != std::string::npos);
  CHECK(line.find("\"detail_base64\"") == std::string::npos);  // valid UTF-8: plain string
  absl::StatusOr<Record> back = FromJsonLine(line);
  REQUIRE(back.ok());
  CHECK(*back == record);
}

TEST_CASE("A JSON line that is not a whole record is refused", "[json]") {
  const std::string good = ToJsonLine(test::SealedLog(1)[0]);
  REQUIRE(FromJsonLine(good).ok());
  auto with = [&good](const std::string& from, const std::string& to) {
    std::string line = good;
    const size_t at = line.find(from);
    REQUIRE(at != std::string::npos);
    return line.replace(at, from.size(), to);
  };
  constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;
  CHECK(CodeOf("") == kInvalid);
  CHECK(CodeOf("[]") == kInvalid);
  CHECK(CodeOf(good.substr(0, good.size() - 1)) == kInvalid);
  CHECK(CodeOf(with("\"role\"", "\"rolE\"")) == kInvalid);        // missing field
  CHECK(CodeOf(with("\"seq\":1", "\"seq\":\"1\"")) == kInvalid);  // mistyped
  CHECK(CodeOf(with("\"seq\":1", "\"seq\":-1")) == kInvalid);     // negative
  CHECK(CodeOf(with("\"seq\":1", "\"seq\":1.0")) == kInvalid);    // not an integer
  CHECK(CodeOf(with("\"key_version\":", "\"key_version\":4294967296,\"x\":")) == kInvalid);
  CHECK(CodeOf(with("\"role\":\"app\"", "\"role\":null")) == kInvalid);
  CHECK(CodeOf(with("\"hash\":\"", "\"hash\":\"00")) == kInvalid);  // 33 bytes
  CHECK(CodeOf(with("\"hash\":\"", "\"hash\":\"A")) == kInvalid);   // not hex
  CHECK(CodeOf(with("\"role\":\"app\"", "\"role\":\"app\",\"role_base64\":\"!!\"")) == kInvalid);
  CHECK(FromJsonLine(with("\"seq\":1", "\"seq\":1,\"siem_tag\":\"x\"")).ok());  // unknown: ignored
}

TEST_CASE("Checkpoint JSON round-trips and carries the signed message", "[json]") {
  test::TestSigningKey key;
  const std::vector<Record> log = test::SealedLog(3);
  const Checkpoint checkpoint = key.CheckpointAt(log, 3);
  const std::string json = CheckpointToJson(checkpoint);
  CHECK(json.find("\"message\": \"custos-audit-checkpoint-v1\\nseq=3\\nhash=" + ToHex(log[2].hash) +
                  "\\ntime=1800000000\\n\"") != std::string::npos);
  absl::StatusOr<Checkpoint> back = CheckpointFromJson(json);
  REQUIRE(back.ok());
  CHECK(*back == checkpoint);
  // Format 2 names its predecessor, in the JSON and in the message.
  const Checkpoint chained = key.ChainedCheckpoints(log, {1, 3}).back();
  const std::string json2 = CheckpointToJson(chained);
  CHECK(json2.find("\"prev_seq\": 1") != std::string::npos);
  CHECK(json2.find("\\nprev_seq=1\\nprev_hash=" + ToHex(log[0].hash) + "\\n") != std::string::npos);
  absl::StatusOr<Checkpoint> back2 = CheckpointFromJson(json2);
  REQUIRE(back2.ok());
  CHECK(*back2 == chained);
  CHECK(*CheckpointFromJsonLine(CheckpointToJsonLine(chained)) == chained);
}

TEST_CASE("Checkpoint JSON that does not parse is INVALID_ARGUMENT", "[json]") {
  test::TestSigningKey key;
  const std::string good = CheckpointToJson(key.CheckpointAt(test::SealedLog(3), 3));
  auto with = [&good](const std::string& from, const std::string& to) {
    std::string json = good;
    const size_t at = json.find(from);
    REQUIRE(at != std::string::npos);
    return json.replace(at, from.size(), to);
  };
  auto code = [](const std::string& json) { return CheckpointFromJson(json).status().code(); };
  constexpr auto kInvalid = absl::StatusCode::kInvalidArgument;
  CHECK(code("not json") == kInvalid);
  CHECK(code("{}") == kInvalid);
  CHECK(code(with("\"seq\": 3", "\"seq\": 0")) == kInvalid);
  CHECK(code(with("\"seq\": 3", "\"seq\": 4")) == kInvalid);  // no longer the signed message
  CHECK(code(with("seq=3", "seq=4")) == kInvalid);
  CHECK(code(with("\"time\": 1800000000", "\"time\": 1800000001")) == kInvalid);
  CHECK(code(with("\"signature\": \"", "\"signature\": \"*")) == kInvalid);
  CHECK(code(with("\"signature\": \"", "\"signature\": \" ")) == kInvalid);
  CHECK(code(with("\"hash\": \"", "\"hash\": \"ab")) == kInvalid);
}

}  // namespace
}  // namespace custos::audit
