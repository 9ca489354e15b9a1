// RowIntegrity's record of the newest audit record per row (Noted, Agrees), which holds the
// file to what custosd wrote or verified while it runs.
#include "storage/row_integrity.h"

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/strings.h"
#include "tests/support/files.h"

namespace custos::storage {
namespace {

class FixedMac final : public RowAuthenticator {
 public:
  absl::StatusOr<Bytes> Mac(std::span<const uint8_t>) override { return Bytes(32, 0x5a); }
};

// libstdc++'s std::hash<std::string> (_Hash_bytes, 64-bit; the project builds with GCC, and
// the test REQUIREs the collision it builds): per 8-byte block b,
// h = (h ^ Mix(b)) * kMul, where Mix and the multiplication are invertible.
constexpr uint64_t kMul = (uint64_t{0xc6a4a793} << 32) + 0x5bd1e995;

uint64_t ShiftMix(uint64_t v) { return v ^ (v >> 47); }  // its own inverse
uint64_t Mix(uint64_t block) { return ShiftMix(block * kMul) * kMul; }
uint64_t Inverse(uint64_t odd) {  // mod 2^64, by Newton's iteration
  uint64_t inverse = odd;
  for (int i = 0; i < 5; ++i) inverse *= 2 - odd * inverse;
  return inverse;
}
uint64_t Unmix(uint64_t mixed) { return ShiftMix(mixed * Inverse(kMul)) * Inverse(kMul); }
uint64_t Block(const std::string& s, size_t at) {
  uint64_t block;
  std::memcpy(&block, s.data() + at, sizeof block);
  return block;
}

// A name of `victim`'s length, starting with `prefix` (8 bytes), whose std::hash is victim's:
// its second block undoes what the first changed, and the rest is victim's.
std::string CollidingName(const std::string& victim, const std::string& prefix) {
  REQUIRE(prefix.size() == 8);
  REQUIRE(victim.size() >= 16);
  const uint64_t start = 0xc70f6907 ^ (victim.size() * kMul);
  const uint64_t after_victim = (start ^ Mix(Block(victim, 0))) * kMul;
  const uint64_t after_prefix = (start ^ Mix(Block(prefix, 0))) * kMul;
  const uint64_t second = Unmix(after_victim ^ Mix(Block(victim, 8)) ^ after_prefix);
  std::string name = victim;
  std::memcpy(name.data(), prefix.data(), 8);
  std::memcpy(name.data() + 8, &second, 8);
  return name;
}

TEST_CASE("A row name crafted to share another row's std::hash does not get that row refused",
          "[row_integrity]") {
  const std::string victim = "key:6f1c2a9e-0d4b-4c8e-9a51-3b7e2f10c4d8";
  const std::string crafted = CollidingName(victim, "tde:mnt/");
  REQUIRE(crafted != victim);
  // The premise: the two names collide in an unkeyed std::hash (as a caller could make a TDE
  // mount's name collide with a key's row).
  REQUIRE(std::hash<std::string>{}(crafted) == std::hash<std::string>{}(victim));

  FixedMac mac;
  AuditTrust trust([](uint64_t, size_t) { return std::vector<audit::Record>(); });
  RowIntegrity integrity(&mac, &trust);
  const RowRecord victims{5, std::string(64, 'a')};
  const RowRecord crafteds{7, std::string(64, 'b')};
  integrity.Noted(victim, victims);
  integrity.Noted(crafted, crafteds);  // newer: a shared slot would now hold it for victim too

  CHECK(integrity.Agrees(victim, victims).ok());
  CHECK(integrity.Agrees(crafted, crafteds).ok());
  CHECK(integrity.Known(victim).ok());
  // Each is still held to its own record.
  const absl::Status older = integrity.Agrees(victim, RowRecord{4, std::string(64, 'c')});
  CHECK(absl::IsDataLoss(older));
  CHECK_THAT(std::string(older.message()),
             Catch::Contains("custosd wrote or checked audit record 5 as the newest naming it"));
}

// An anchor whose later records this process has not verified (the archival's checkpoint,
// set at start before the walk) proves nothing about rows it never noted: one named after the
// anchor is believed. Anchored over records it verified or wrote, such a row was renamed since.
TEST_CASE("A row never noted is refused only past an anchor whose later rows were noted",
          "[row_integrity]") {
  FixedMac mac;
  AuditTrust trust([](uint64_t, size_t) { return std::vector<audit::Record>(); });
  RowIntegrity integrity(&mac, &trust);
  trust.NoteCommitted(20);
  const std::string row = "key:3d0c1e5a-8f2b-4a71-b6d9-0e4c7a215f83";
  const RowRecord named{15, std::string(64, 'd')};

  trust.Anchor(10, Bytes(32, 0x11), /*rows_noted=*/false);
  CHECK_FALSE(trust.anchored());
  CHECK(integrity.Agrees(row, named).ok());

  trust.Anchor(10, Bytes(32, 0x11));
  REQUIRE(trust.anchored());
  const absl::Status renamed = integrity.Agrees(row, named);
  CHECK(absl::IsDataLoss(renamed));
  CHECK_THAT(std::string(renamed.message()),
             Catch::Contains("audit record 15 names it now, but did not when custosd verified or "
                             "wrote it"));
  // At or before the anchor, or past the last commit (which Cover refuses), it says nothing.
  CHECK(integrity.Agrees("key:other-a", RowRecord{10, std::string(64, 'e')}).ok());
  CHECK(integrity.Agrees("key:other-b", RowRecord{21, std::string(64, 'f')}).ok());
}

// A measurement, not a test (hidden): the memory and time a noted row takes, which bounds what
// a walked live log costs custosd (docs/PERFORMANCE.md, "Memory per noted row").
TEST_CASE("Memory per noted row", "[.row_heads_memory]") {
  constexpr int kRows = 2'000'000;
  FixedMac mac;
  AuditTrust trust([](uint64_t, size_t) { return std::vector<audit::Record>(); });
  RowIntegrity integrity(&mac, &trust);
  const RowRecord record{1, std::string(64, 'a')};
  const size_t before = testing::ResidentBytes();
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < kRows; ++i) {
    // Names as Custos makes them: "key:" and a 36-character id.
    integrity.Noted(StrCat("key:0b0e1c6a-5b7d-4c55-9f1e-", 100'000'000'000 + i), record);
  }
  const auto took = std::chrono::steady_clock::now() - start;
  const size_t after = testing::ResidentBytes();
  CHECK(integrity.Agrees("key:0b0e1c6a-5b7d-4c55-9f1e-100000000000", record).ok());
  WARN("bytes per noted row: " << (after - before) / kRows << "; ns per Noted: "
                               << std::chrono::nanoseconds(took).count() / kRows);
}

}  // namespace
}  // namespace custos::storage
