// The verifier against every way of tampering with a log: an edited byte anywhere, deleted,
// swapped and duplicated records, a truncated tail, a consistently rewritten tail, forged
// checkpoints and anchors. Each failure must name the record where the log goes wrong.
#include "audit/verifier.h"

#include <openssl/evp.h>
#include <openssl/pem.h>

#include <catch2/catch.hpp>
#include <sstream>

#include "tests/audit/audit_test_util.h"

namespace custos::audit {
namespace {

using test::Reseal;
using test::SealedLog;

const test::TestSigningKey& Key() {
  static const test::TestSigningKey key;
  return key;
}

const PublicKeyVerifier& KeyVerifier() {
  static const PublicKeyVerifier verifier = *PublicKeyVerifier::FromPem(Key().PublicPem());
  return verifier;
}

VerifyReport Check(const std::vector<Record>& log, const std::vector<Checkpoint>& checkpoints = {},
                   const Checkpoint* anchor = nullptr) {
  VectorRecordSource source(log);
  return Verify(source, checkpoints, anchor, KeyVerifier());
}

std::string JsonLines(const std::vector<Record>& log) {
  std::string out;
  for (const Record& record : log) out += ToJsonLine(record) + "\n";
  return out;
}

VerifyReport CheckJsonLines(const std::string& text) {
  std::istringstream in(text);
  JsonLinesRecordSource source(&in);
  return Verify(source, {}, nullptr, KeyVerifier());
}

// The report names `seq` as the first bad record.
void RequireNames(const VerifyReport& report, uint64_t seq, std::string_view words = "") {
  INFO(report.reason);
  REQUIRE_FALSE(report.ok);
  REQUIRE(report.first_bad_seq == seq);
  REQUIRE(report.reason.find(std::to_string(seq)) != std::string::npos);
  REQUIRE(report.reason.find(words) != std::string::npos);
  REQUIRE(report.last_verified_seq == (seq == 0 ? 0 : seq - 1));
  REQUIRE(report.records_checked == report.last_verified_seq);
}

std::string PemOf(EVP_PKEY* key) {
  BIO* bio = BIO_new(BIO_s_mem());
  REQUIRE(PEM_write_bio_PUBKEY(bio, key) == 1);
  char* data = nullptr;
  const long size = BIO_get_mem_data(bio, &data);
  std::string pem(data, static_cast<size_t>(size));
  BIO_free(bio);
  EVP_PKEY_free(key);
  return pem;
}

TEST_CASE("The public key must be a P-256 key in PEM", "[verifier]") {
  CHECK(PublicKeyVerifier::FromPem(Key().PublicPem()).ok());
  CHECK(PublicKeyVerifier::FromPem("").status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(PublicKeyVerifier::FromPem("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
            .status()
            .code() == absl::StatusCode::kInvalidArgument);
  const std::string p384 = PemOf(EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-384"));
  CHECK(PublicKeyVerifier::FromPem(p384).status().code() == absl::StatusCode::kInvalidArgument);
  const std::string ed25519 = PemOf(EVP_PKEY_Q_keygen(nullptr, nullptr, "ED25519"));
  CHECK(PublicKeyVerifier::FromPem(ed25519).status().code() == absl::StatusCode::kInvalidArgument);
}

TEST_CASE("An intact chain with checkpoints verifies", "[verifier]") {
  const std::vector<Record> log = SealedLog(50);
  const std::vector<Checkpoint> checkpoints = {Key().CheckpointAt(log, 40),
                                               Key().CheckpointAt(log, 10)};
  const VerifyReport report = Check(log, checkpoints);
  INFO(report.reason);
  CHECK(report.ok);
  CHECK(report.records_checked == 50);
  CHECK(report.first_bad_seq == 0);
  CHECK(report.reason.empty());
  CHECK(report.last_verified_seq == 50);
  CHECK(report.last_verified_hash == log.back().hash);
  CHECK(report.checkpoints_verified == 2);
  CHECK(report.signed_through_seq == 40);
  CHECK(report.caveat == "no anchor checkpoint given: truncation of the tail cannot be ruled out");
  CHECK(report.Summary().rfind("OK: records 1 to 50 verified", 0) == 0);

  const Checkpoint anchor = Key().CheckpointAt(log, 50);
  const VerifyReport anchored = Check(log, checkpoints, &anchor);
  CHECK(anchored.ok);
  CHECK(anchored.signed_through_seq == 50);
  CHECK(anchored.caveat.empty());
}

TEST_CASE("Format 2 checkpoints form a chain: a deleted one is named", "[verifier]") {
  const std::vector<Record> log = SealedLog(50);
  std::vector<Checkpoint> chained = Key().ChainedCheckpoints(log, {10, 20, 30, 40});
  const VerifyReport intact = Check(log, chained);
  INFO(intact.reason);
  CHECK(intact.ok);
  CHECK(intact.checkpoints_verified == 4);
  // The stored checkpoint at 20 removed (by someone who could write the database).
  std::vector<Checkpoint> without_20 = {chained[0], chained[2], chained[3]};
  const VerifyReport gap = Check(log, without_20);
  CHECK_FALSE(gap.ok);
  CHECK(gap.first_bad_seq == 30);
  CHECK(gap.reason ==
        "checkpoint at 30 follows a checkpoint at 20 that the log does not hold "
        "(deleted?)");
  // Format 1 checkpoints before format 2 ones: the first format 2 one names the last of them.
  std::vector<Checkpoint> mixed = {Key().CheckpointAt(log, 5)};
  Checkpoint next = chained[0];
  next.prev_seq = 5;
  next.prev_hash = log[4].hash;
  next.signature = Key().Sign(CheckpointMessage(next));
  mixed.push_back(next);
  CHECK(Check(log, mixed).ok);
}

TEST_CASE("A format 1 record cannot carry format 2 fields, nor follow format 2", "[verifier]") {
  std::vector<Record> log = SealedLog(6);
  std::vector<Record> v1_with_row = log;
  v1_with_row[2].format = 1;
  v1_with_row[2].row = "key:x";  // outside what its format 1 hash covers
  Chain chain;
  for (Record& r : v1_with_row) chain.Seal(r);
  const VerifyReport smuggled = Check(v1_with_row);
  CHECK_FALSE(smuggled.ok);
  CHECK(smuggled.first_bad_seq == 3);
  CHECK_THAT(smuggled.reason, Catch::Contains("format 1 with format 2 fields"));
  std::vector<Record> downgraded = log;
  downgraded[4].format = 1;
  downgraded[4].call_id.clear();
  downgraded[4].row.clear();
  downgraded[4].row_digest.clear();
  Chain again;
  for (Record& r : downgraded) again.Seal(r);
  const VerifyReport back = Check(downgraded);
  CHECK_FALSE(back.ok);
  CHECK(back.first_bad_seq == 5);
  CHECK_THAT(back.reason, Catch::Contains("format 1 after format 2 records"));
}

TEST_CASE("An empty log verifies, with the caveat", "[verifier]") {
  const VerifyReport report = Check({});
  CHECK(report.ok);
  CHECK(report.records_checked == 0);
  CHECK(report.last_verified_hash == Bytes(32, 0));
  CHECK(!report.caveat.empty());
}

TEST_CASE("An edit of any byte of any field names that record", "[verifier]") {
  const std::vector<Record> log = SealedLog(10);
  using Text = std::string Record::*;
  const std::vector<std::pair<const char*, Text>> texts = {
      {"principal", &Record::principal},
      {"role", &Record::role},
      {"action", &Record::action},
      {"key_id", &Record::key_id},
      {"source_key_id", &Record::source_key_id},
      {"request_id", &Record::request_id},
      {"outcome", &Record::outcome},
      {"peer", &Record::peer},
      {"context_hmac", &Record::context_hmac},
      {"detail", &Record::detail}};
  for (const uint64_t seq : {1, 4, 10}) {  // first, middle, last
    INFO("record " << seq);
    auto expect_caught = [&](const std::function<void(Record&)>& edit) {
      std::vector<Record> edited = log;
      edit(edited[seq - 1]);
      REQUIRE(edited[seq - 1] != log[seq - 1]);
      RequireNames(Check(edited), seq);
    };
    for (const auto& [name, field] : texts) {
      INFO(name);
      const size_t size = (log[seq - 1].*field).size();
      for (size_t i = 0; i < size; ++i) {
        for (const uint8_t flip : {0x01, 0x80}) {
          expect_caught(
              [&](Record& r) { (r.*field)[i] = static_cast<char>((r.*field)[i] ^ flip); });
        }
      }
      expect_caught([&](Record& r) { (r.*field).push_back('x'); });
      expect_caught([&](Record& r) { (r.*field).insert(0, 1, '\0'); });
      if (size > 0) expect_caught([&](Record& r) { (r.*field).pop_back(); });
    }
    for (int bit = 0; bit < 64; ++bit) {
      expect_caught([&](Record& r) { r.seq ^= uint64_t{1} << bit; });
      expect_caught([&](Record& r) { r.time ^= int64_t{1} << bit; });
    }
    for (int bit = 0; bit < 32; ++bit) {
      expect_caught([&](Record& r) { r.key_version ^= uint32_t{1} << bit; });
      expect_caught([&](Record& r) { r.source_key_version ^= uint32_t{1} << bit; });
    }
    for (size_t i = 0; i < kHashBytes; ++i) {
      expect_caught([&](Record& r) { r.hash[i] ^= 0x01; });
    }
    expect_caught([&](Record& r) { r.hash.pop_back(); });
  }
}

TEST_CASE("An edit of any byte of an exported line names that record", "[verifier]") {
  const std::vector<Record> log = SealedLog(10);
  REQUIRE(CheckJsonLines(JsonLines(log)).ok);
  for (const uint64_t seq : {1, 6, 10}) {
    std::vector<std::string> lines;
    for (const Record& record : log) lines.push_back(ToJsonLine(record));
    const std::string original = lines[seq - 1];
    for (size_t i = 0; i < original.size(); ++i) {
      INFO("record " << seq << ", byte " << i);
      lines[seq - 1] = original;
      lines[seq - 1][i] = static_cast<char>(original[i] ^ 0x01);
      std::string text;
      for (const std::string& line : lines) text += line + "\n";
      RequireNames(CheckJsonLines(text), seq);
    }
  }
}

TEST_CASE("A deleted record is named", "[verifier]") {
  std::vector<Record> log = SealedLog(50);
  std::vector<Record> one = log;
  one.erase(one.begin() + 41);
  RequireNames(Check(one), 42, "record 41 is followed by 43 (record 42 deleted?)");

  std::vector<Record> three = log;
  three.erase(three.begin() + 41, three.begin() + 44);
  RequireNames(Check(three), 42, "record 41 is followed by 45 (records 42 to 44 deleted?)");

  std::vector<Record> first = log;
  first.erase(first.begin());
  RequireNames(Check(first), 1,
               "the log starts at record 2, not 1, and holds no checkpoint at 1 to start from "
               "(record 1 deleted, or archived up to a different record?)");
}

TEST_CASE("Swapped records are named", "[verifier]") {
  const std::vector<Record> log = SealedLog(50);
  // Lines swapped in an export.
  std::vector<Record> lines = log;
  std::swap(lines[41], lines[42]);
  RequireNames(Check(lines), 42, "records out of order at 42: record 43 comes before record 42");

  // Contents swapped under their seqs and hashes (as rows of a table would be).
  std::vector<Record> contents = log;
  std::swap(contents[41], contents[42]);
  std::swap(contents[41].seq, contents[42].seq);
  std::swap(contents[41].hash, contents[42].hash);
  RequireNames(Check(contents), 42, "record 42: hash does not match its contents (edited?)");

  // Farther apart.
  std::vector<Record> far = log;
  std::swap(far[9], far[19]);
  RequireNames(Check(far), 10, "record 10: found record 20 in its place");
}

TEST_CASE("A duplicated record is named", "[verifier]") {
  std::vector<Record> log = SealedLog(50);
  log.insert(log.begin() + 20, log[19]);
  RequireNames(Check(log), 21, "record 20 appears again after record 20 (duplicated?)");
}

TEST_CASE("A truncated tail is caught only with an anchor or a checkpoint past the end",
          "[verifier]") {
  const std::vector<Record> log = SealedLog(120);
  std::vector<Record> truncated(log.begin(), log.begin() + 97);

  const VerifyReport blind = Check(truncated);
  CHECK(blind.ok);
  CHECK(blind.caveat == "no anchor checkpoint given: truncation of the tail cannot be ruled out");
  CHECK(blind.Summary().find(blind.caveat) != std::string::npos);

  const Checkpoint anchor = Key().CheckpointAt(log, 120);
  RequireNames(Check(truncated, {}, &anchor), 98,
               "log ends at 97 but the anchor checkpoint is at 120: the tail was truncated");
  RequireNames(Check({}, {}, &anchor), 1,
               "the log is empty but the anchor checkpoint is at 120: the tail was truncated");
  // The attacker left a checkpoint behind.
  RequireNames(Check(truncated, {Key().CheckpointAt(log, 110)}), 98,
               "log ends at 97 but it holds a signed checkpoint at 110: the tail was truncated");
  // An anchor earlier than the cut does not see it, and the report says so.
  const Checkpoint early = Key().CheckpointAt(log, 90);
  const VerifyReport after_anchor = Check(truncated, {}, &early);
  CHECK(after_anchor.ok);
  CHECK(after_anchor.signed_through_seq == 90);
  CHECK(after_anchor.caveat ==
        "records after 90 (the anchor) are not covered by it: truncation after record 90 "
        "cannot be ruled out");
}

TEST_CASE("A consistently rewritten tail is caught by the anchor or a signed checkpoint",
          "[verifier]") {
  const std::vector<Record> log = SealedLog(150);
  std::vector<Record> forged = log;
  forged[99].detail = "nothing happened here";
  forged[99].outcome = "PERMISSION_DENIED";
  Reseal(forged, 99);  // from record 100 on
  forged.resize(130);  // and drop some of the tail too

  // The chain alone cannot tell: that is what checkpoints and anchors are for.
  CHECK(Check(forged).ok);

  const Checkpoint anchor = Key().CheckpointAt(log, 120);
  RequireNames(Check(forged, {}, &anchor), 120,
               "the hash at 120 differs from the anchor: history was rewritten");

  const std::vector<Checkpoint> in_log = {Key().CheckpointAt(log, 50),
                                          Key().CheckpointAt(log, 110)};
  RequireNames(Check(forged, in_log), 110,
               "record 110: hash differs from the signed checkpoint at 110: history up to 110 "
               "was rewritten");

  // The forger moves the checkpoint to the new hash: its signature no longer holds.
  std::vector<Checkpoint> moved = in_log;
  moved[1].hash = forged[109].hash;
  RequireNames(Check(forged, moved), 110, "checkpoint at 110: signature does not verify");
  // ... or signs it with a key of their own.
  test::TestSigningKey own_key;
  RequireNames(Check(forged, {in_log[0], own_key.CheckpointAt(forged, 110)}), 110,
               "signature does not verify under the given public key");

  // A rewrite after the anchor is outside what the anchor proves, and the report says so.
  const Checkpoint early = Key().CheckpointAt(log, 80);
  const VerifyReport report = Check(forged, {in_log[0]}, &early);
  CHECK(report.ok);
  CHECK(report.caveat.find("truncation after record 80 cannot be ruled out") != std::string::npos);
}

TEST_CASE("A checkpoint with a bad signature is named", "[verifier]") {
  const std::vector<Record> log = SealedLog(30);
  const Checkpoint good = Key().CheckpointAt(log, 20);
  REQUIRE(Check(log, {good}).ok);

  for (size_t i = 0; i < good.signature.size(); ++i) {
    Checkpoint bad = good;
    bad.signature[i] ^= 0x01;
    RequireNames(Check(log, {Key().CheckpointAt(log, 10), bad}), 20,
                 "checkpoint at 20: signature does not verify under the given public key");
  }
  Checkpoint retimed = good;
  retimed.time += 1;  // the time is signed too
  RequireNames(Check(log, {retimed}), 20, "checkpoint at 20: signature does not verify");
  Checkpoint truncated_sig = good;
  truncated_sig.signature.pop_back();
  RequireNames(Check(log, {truncated_sig}), 20, "checkpoint at 20: signature does not verify");
  Checkpoint short_hash = good;
  short_hash.hash.pop_back();
  CHECK_FALSE(Check(log, {short_hash}).ok);
  // A bad signature on a checkpoint past the end is named as such, not as truncation.
  Checkpoint beyond = Key().CheckpointAt(SealedLog(40), 35);
  beyond.signature[10] ^= 0x01;
  const VerifyReport report = Check(log, {beyond});
  CHECK_FALSE(report.ok);
  CHECK(report.first_bad_seq == 35);
  CHECK(report.reason.rfind("checkpoint at 35: signature does not verify", 0) == 0);
  CHECK(report.last_verified_seq == 30);
}

TEST_CASE("An anchor with a bad signature proves nothing and fails the check", "[verifier]") {
  const std::vector<Record> log = SealedLog(30);
  Checkpoint anchor = Key().CheckpointAt(log, 30);
  anchor.signature.back() ^= 0x01;
  const VerifyReport report = Check(log, {}, &anchor);
  CHECK_FALSE(report.ok);
  CHECK(report.first_bad_seq == 0);
  CHECK(report.reason.find("the anchor checkpoint's signature does not verify") !=
        std::string::npos);

  test::TestSigningKey other;
  const Checkpoint foreign = other.CheckpointAt(log, 30);
  CHECK_FALSE(Check(log, {}, &foreign).ok);
}

TEST_CASE("An exported checkpoint and an exported log verify together", "[verifier]") {
  const std::vector<Record> log = SealedLog(40);
  absl::StatusOr<Checkpoint> anchor =
      CheckpointFromJson(CheckpointToJson(Key().CheckpointAt(log, 40)));
  REQUIRE(anchor.ok());
  std::istringstream in(JsonLines(log) + "\n\n");  // blank lines are skipped
  JsonLinesRecordSource source(&in);
  const VerifyReport report = Verify(source, {}, &*anchor, KeyVerifier());
  INFO(report.reason);
  CHECK(report.ok);
  CHECK(report.records_checked == 40);
  CHECK(report.caveat.empty());
}

TEST_CASE("A line that does not parse is named by line and record", "[verifier]") {
  const std::vector<Record> log = SealedLog(5);
  std::string text = JsonLines(log);
  const size_t third = text.find("{\"seq\":3");
  text.insert(third, "garbage");
  const VerifyReport report = CheckJsonLines(text);
  RequireNames(report, 3, "cannot read the record after 2: line 3: not a JSON object");
  CHECK(report.Summary().find("Verified before that: records 1 to 2") != std::string::npos);
}

class FailingSource final : public RecordSource {
 public:
  absl::StatusOr<std::optional<Record>> Next() override {
    return absl::UnavailableError("database is locked");
  }
};

TEST_CASE("A source that cannot be read fails the check", "[verifier]") {
  FailingSource source;
  const VerifyReport report = Verify(source, {}, nullptr, KeyVerifier());
  CHECK_FALSE(report.ok);
  CHECK(report.first_bad_seq == 1);
  CHECK(report.reason == "cannot read the first record: database is locked");
}

}  // namespace
TEST_CASE("An archived log starts from the signed checkpoint its archive ends with",
          "[verifier][archive]") {
  std::vector<Record> log = SealedLog(60);
  // The record of the archival up to 20, as custosd writes it, in the live part.
  log[24].action = "ArchiveAuditLog";
  log[24].detail =
      "records 1 to 20 and 2 checkpoints archived to a.jsonl sha256=00; the live "
      "log starts after the checkpoint at 20 (hash " +
      ToHex(log[19].hash) + ")";
  Reseal(log, 24);
  const std::vector<Checkpoint> chained = Key().ChainedCheckpoints(log, {10, 20, 40, 60});
  const std::vector<Record> archive(log.begin(), log.begin() + 20);  // records 1 to 20
  const std::vector<Record> live(log.begin() + 20, log.end());       // 21 to 60

  // The archive on its own: records 1 to 20 and the checkpoints up to 20.
  const VerifyReport archived = Check(archive, {chained[0], chained[1]}, &chained[1]);
  INFO(archived.reason);
  REQUIRE(archived.ok);
  CHECK(archived.starts_after == 0);
  CHECK(archived.last_verified_seq == 20);

  // The live log holds the checkpoint at 20 and goes on from its hash.
  const VerifyReport rest = Check(live, {chained[1], chained[2], chained[3]});
  INFO(rest.reason);
  REQUIRE(rest.ok);
  CHECK(rest.first_seq == 21);
  CHECK(rest.starts_after == 20);
  CHECK(rest.records_checked == 40);
  CHECK(rest.last_verified_seq == 60);
  CHECK(rest.checkpoints_verified == 3);
  CHECK(rest.signed_through_seq == 60);
  CHECK(rest.Summary().find("OK: records 21 to 60 verified") != std::string::npos);
  CHECK(rest.Summary().find("records 1 to 20 were archived") != std::string::npos);

  // Both together, as one log: the seam is checked like any other link.
  VectorRecordSource first(archive);
  VectorRecordSource second(live);
  ConcatenatedRecordSource both({&first, &second});
  const VerifyReport whole = Verify(both, chained, &chained[3], KeyVerifier());
  INFO(whole.reason);
  REQUIRE(whole.ok);
  CHECK(whole.starts_after == 0);
  CHECK(whole.records_checked == 60);

  // Records removed beyond the archive: the archive and the live log no longer meet.
  const std::vector<Record> cut(log.begin() + 40, log.end());  // 41 to 60, from checkpoint 40
  VectorRecordSource again(archive);
  VectorRecordSource later(cut);
  ConcatenatedRecordSource gap({&again, &later});
  const VerifyReport broken = Verify(gap, chained, nullptr, KeyVerifier());
  CHECK_FALSE(broken.ok);
  CHECK(broken.first_bad_seq == 21);
  CHECK(broken.reason == "record 20 is followed by 41 (records 21 to 40 deleted?)");
  // Alone, such a log verifies from checkpoint 40; an anchor the auditor kept shows the cut.
  const Checkpoint kept = Key().CheckpointAt(log, 30);
  const VerifyReport alone = Check(cut, {chained[2], chained[3]}, &kept);
  CHECK_FALSE(alone.ok);
  CHECK(alone.reason ==
        "the anchor checkpoint is at 30, but this log starts at 41 (records 1 to 40 were "
        "archived): verify it with the archive that holds it");

  // A copy cut at a later checkpoint looks archived there, but no signed record says so.
  const VerifyReport cut_at_40 = Check(cut, {chained[2], chained[3]});
  CHECK_FALSE(cut_at_40.ok);
  CHECK(cut_at_40.reason ==
        "the log starts after the checkpoint at 40, but holds no ArchiveAuditLog record covered "
        "by a signature saying it was archived up to there: records 1 to 40 may have been cut "
        "off");
  // Nor is the record believed after the last signature (anyone can append such a tail).
  const std::vector<Record> unsigned_record(log.begin() + 20, log.begin() + 30);
  const VerifyReport tail = Check(unsigned_record, {chained[1]});
  CHECK_FALSE(tail.ok);
  CHECK(tail.first_bad_seq == 21);

  // A start checkpoint that is not signed by the key proves nothing.
  std::vector<Checkpoint> forged = {chained[1], chained[2], chained[3]};
  forged[0].signature[10] ^= 1;
  const VerifyReport unsigned_start = Check(live, forged);
  CHECK_FALSE(unsigned_start.ok);
  CHECK(unsigned_start.first_bad_seq == 21);
  CHECK(unsigned_start.reason.find("the log starts at record 21 after the checkpoint at 20, whose "
                                   "signature does not verify") == 0);
  // Record 21 edited: it no longer chains to the checkpoint's hash.
  std::vector<Record> edited = live;
  edited[0].detail = "changed";
  const VerifyReport bad_link = Check(edited, {chained[1], chained[2], chained[3]});
  CHECK_FALSE(bad_link.ok);
  CHECK(bad_link.first_bad_seq == 21);
}

}  // namespace custos::audit
