// AuditTrust over a log held in memory: which records are believed, what is recomputed to
// believe an older one, and that a changed, added or removed record is found and remembered.
#include "storage/audit_trust.h"

#include <catch2/catch.hpp>

#include <algorithm>
#include <vector>

namespace custos::storage {
namespace {

struct Log {
  std::vector<audit::Record> records;
  size_t reads = 0;  // records handed to AuditTrust

  explicit Log(int n) {
    audit::Chain chain;
    for (int i = 0; i < n; ++i) {
      audit::Record record;
      record.time = 1'800'000'000 + i;
      record.principal = "custosd";
      record.action = "Test";
      record.format = 2;
      chain.Seal(record);
      records.push_back(record);
    }
  }

  AuditTrust::ReadRecords Reader() {
    return [this](uint64_t from, size_t limit) -> absl::StatusOr<std::vector<audit::Record>> {
      std::vector<audit::Record> out;
      for (const audit::Record& r : records) {
        if (r.seq >= from && out.size() < limit) out.push_back(r);
      }
      reads += out.size();
      return out;
    };
  }
  const Bytes& HashAt(uint64_t seq) const { return records[seq - 1].hash; }
};

TEST_CASE("Unanchored, every record is believed without reading any", "[audit_trust]") {
  Log log(10);
  AuditTrust trust(log.Reader());
  CHECK(trust.Cover(1).ok());
  CHECK(trust.Extend(100).ok());
  CHECK(log.reads == 0);
}

TEST_CASE("An older record is believed once the records up to the anchor reproduce its hash",
          "[audit_trust]") {
  Log log(10);
  AuditTrust trust(log.Reader());
  trust.Anchor(10, log.HashAt(10));
  CHECK(trust.Cover(11).ok());  // after the anchor: checked at start-up already
  CHECK(log.reads == 0);
  CHECK(trust.Cover(5).ok());  // record 4's hash, then records 5 to 10
  CHECK(log.reads == 7);
  CHECK(trust.trusted_seq() == 4);
  CHECK(trust.Cover(6).ok());  // each record is recomputed once per run
  CHECK(log.reads == 7);
  CHECK(trust.Cover(1).ok());
  CHECK(trust.trusted_seq() == 0);
}

TEST_CASE("Maintenance walks down to record 1 a slice at a time", "[audit_trust]") {
  Log log(10);
  AuditTrust trust(log.Reader());
  trust.Anchor(10, log.HashAt(10));
  for (uint64_t expected : {7, 4, 1, 0, 0}) {
    REQUIRE(trust.Extend(3).ok());
    CHECK(trust.trusted_seq() == expected);
  }
}

TEST_CASE("A record changed without touching any hash is found, and nothing before is believed",
          "[audit_trust]") {
  Log log(10);
  log.records[2].principal = "someone-else";  // record 3: the stored hashes all stay as they were
  AuditTrust trust(log.Reader());
  trust.Anchor(10, log.HashAt(10));
  CHECK(trust.Cover(8).ok());
  const absl::Status refused = trust.Cover(2);
  CHECK(absl::IsFailedPrecondition(refused));
  CHECK(refused.message() ==
        "audit records 2 to 7 do not chain to the hash signed at record 7: a record among them "
        "was changed, added or removed after it was written");
  CHECK(trust.Cover(1) == refused);  // remembered
  CHECK(trust.Cover(5) == refused);
  CHECK(trust.Extend(100) == refused);
  CHECK(trust.Cover(8).ok());  // what was proven stays proven
  // A new anchor (a re-anchoring) starts afresh.
  trust.Anchor(0, Bytes(audit::kHashBytes, 0));
  CHECK(trust.Cover(1).ok());
}

TEST_CASE("A removed record is found", "[audit_trust]") {
  Log log(10);
  log.records.erase(log.records.begin() + 4);  // record 5
  AuditTrust trust(log.Reader());
  trust.Anchor(10, log.HashAt(9));  // record 10 is now at index 8
  const absl::Status refused = trust.Cover(3);
  CHECK(absl::IsFailedPrecondition(refused));
  CHECK(refused.message() == "audit record 5 is missing from the log (it goes on at 6)");
  CHECK(absl::IsFailedPrecondition(trust.Cover(6)));
}

TEST_CASE("A failing read is passed on and remembers nothing", "[audit_trust]") {
  Log log(10);
  bool down = true;
  AuditTrust::ReadRecords read = log.Reader();
  AuditTrust trust([&](uint64_t from, size_t limit) -> absl::StatusOr<std::vector<audit::Record>> {
    if (down) return absl::UnavailableError("disk I/O error");
    return read(from, limit);
  });
  trust.Anchor(10, log.HashAt(10));
  CHECK(absl::IsUnavailable(trust.Cover(3)));
  down = false;
  CHECK(trust.Cover(3).ok());
}

TEST_CASE("After an archival the walk ends at the floor, chained from its signed hash",
          "[audit_trust][archive]") {
  Log log(30);
  const Bytes floor_hash = log.HashAt(10);
  log.records.erase(log.records.begin(), log.records.begin() + 10);  // 1 to 10 archived
  AuditTrust trust(log.Reader());
  trust.SetFloor(10, floor_hash);
  trust.Anchor(30, log.records[19].hash);
  // Record 11 chains from the floor's hash, not from a record 10 the log no longer holds.
  CHECK(trust.Cover(11).ok());
  CHECK(trust.trusted_seq() == 10);
  CHECK(log.reads == 20);
  CHECK(trust.Extend(1000).ok());  // nothing below the floor to walk
  CHECK(log.reads == 20);
  // A row vouched for by an archived record is asked about again, not refused.
  CHECK(trust.Cover(7).code() == absl::StatusCode::kUnavailable);

  // A different floor hash (a forged start) does not reproduce the anchor.
  AuditTrust forged(log.Reader());
  forged.SetFloor(10, Bytes(audit::kHashBytes, 7));
  forged.Anchor(30, log.records[19].hash);
  CHECK(forged.Cover(11).code() == absl::StatusCode::kFailedPrecondition);

  // Records archived while a walk ran (the store commits an archival, setting the floor,
  // between two of the walk's reads): the caller may retry, nothing is remembered as broken.
  Log racing(30);
  AuditTrust* walking = nullptr;
  int reads = 0;
  AuditTrust walked([&](uint64_t from, size_t limit) {
    if (++reads == 2) {
      const Bytes hash = racing.HashAt(10);
      racing.records.erase(racing.records.begin(), racing.records.begin() + 10);
      walking->SetFloor(10, hash);
    }
    return racing.Reader()(from, limit);
  });
  walking = &walked;
  walked.Anchor(30, racing.records[29].hash);
  CHECK(walked.Cover(5).code() == absl::StatusCode::kUnavailable);
  CHECK(walked.Cover(11).ok());
}

}  // namespace
}  // namespace custos::storage
