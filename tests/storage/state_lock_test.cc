// One process per key database (StateLock), SQLite's own locks kept intact while the store is
// open, and a full disk reported as one.
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>

#include "storage/key_store.h"
#include "storage/state_lock.h"
#include "tests/storage/store_test_util.h"
#include "tests/support/temp_dir.h"

namespace custos::storage {
namespace {

using custos::testing::TempDir;
using namespace custos::storage::test;  // NOLINT: the shared helpers

// The POSIX (fcntl) locks process `pid` holds on `path`, from /proc/locks, as
// "<READ|WRITE> <start> <end>" lines.
std::string PosixLocksOf(pid_t pid, const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  const std::string inode = ":" + std::to_string(st.st_ino) + " ";
  std::ifstream in("/proc/locks");
  std::string line, found;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string ordinal, kind, advisory, mode, owner, device, start, end;
    fields >> ordinal >> kind >> advisory >> mode >> owner >> device >> start >> end;
    if (kind == "POSIX" && owner == std::to_string(pid) && (device + " ").ends_with(inode)) {
      found += mode + " " + start + " " + end + "\n";
    }
  }
  return found;
}

TEST_CASE("A second store on the same database is refused, naming the holder", "[state_lock]") {
  TempDir dir;
  const std::string path = dir.File("keys.db");
  auto first = OpenStore(path);
  REQUIRE(first->CreateKey(MakeSmallKey(1)).ok());

  absl::StatusOr<std::unique_ptr<KeyStore>> second = KeyStore::Open(path);
  REQUIRE(second.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(second.status().message()),
             Catch::Contains("in use by another process (pid " + std::to_string(::getpid())) &&
                 Catch::Contains(path + ".lock"));

  // Another process is refused too, before it reads or writes anything.
  const pid_t child = ::fork();
  if (child == 0)
    _exit(KeyStore::Open(path).status().code() == absl::StatusCode::kFailedPrecondition ? 0 : 1);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);

  // The lock goes with the store: the next one opens and sees what the first wrote.
  first.reset();
  auto third = OpenStore(path);
  CHECK(third->GetKey(IdFor(1)).ok());
}

TEST_CASE("StateLock names no pid when the holder has not written one yet", "[state_lock]") {
  TempDir dir;
  auto held = StateLock::Acquire(dir.File("x.lock"));
  REQUIRE(held.ok());
  REQUIRE(::truncate(dir.File("x.lock").c_str(), 0) == 0);
  auto refused = StateLock::Acquire(dir.File("x.lock"));
  CHECK(refused.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(refused.status().message()), Catch::Contains("not written its pid"));
}

TEST_CASE("The open store keeps SQLite's locks on its -shm file", "[state_lock]") {
  // A reader in another process that finds no lock on the -shm file believes it is alone and
  // reinitialises the shared memory the store has mapped (the server died of SIGBUS).
  TempDir dir;
  const std::string path = dir.File("keys.db");
  {  // Leave -wal and -shm files behind with a loose mode, as an older run might.
    auto store = OpenStore(path);
    REQUIRE(store->CreateKey(MakeSmallKey(1)).ok());
  }
  std::ofstream(path + "-wal", std::ios::app).flush();
  std::ofstream(path + "-shm", std::ios::app).flush();
  REQUIRE(::chmod((path + "-wal").c_str(), 0644) == 0);
  REQUIRE(::chmod((path + "-shm").c_str(), 0644) == 0);

  auto store = OpenStore(path);
  REQUIRE(store->CreateKey(MakeSmallKey(2)).ok());
  // SQLite's "DMS" read lock (byte 128) is held for as long as the connection is open.
  CHECK_THAT(PosixLocksOf(::getpid(), path + "-shm"), Catch::Contains("READ 128 128"));
  struct stat st {};
  REQUIRE(::stat((path + "-shm").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
  REQUIRE(::stat((path + "-wal").c_str(), &st) == 0);
  CHECK((st.st_mode & 0777) == 0600);
}

TEST_CASE("A full disk is reported as a full disk, and writes work again once space is freed",
          "[state_lock][disk_full]") {
  TempDir dir;
  const std::string volume = dir.File("volume");
  REQUIRE(::mkdir(volume.c_str(), 0700) == 0);
  // A small tmpfs of our own fills in an instant and hurts nobody (needs root, as CI runs).
  INFO("mount tmpfs: " << std::strerror(errno));
  REQUIRE(::mount("tmpfs", volume.c_str(), "tmpfs", 0, "size=2m,mode=0700") == 0);
  struct Unmount {
    std::string at;
    ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
  } unmount{volume};

  auto store = OpenStore(volume + "/keys.db");
  REQUIRE(store->CreateKey(MakeSmallKey(1)).ok());
  {  // Fill what is left.
    std::ofstream filler(volume + "/filler", std::ios::binary);
    const std::string block(64 * 1024, 'x');
    while (filler.write(block.data(), block.size())) {
    }
  }
  absl::Status status;
  for (int n = 2; n < 200 && status.ok(); ++n) {
    WriteBatch batch;
    KeyRecord key = MakeKey(n);
    key.description = std::string(8000, 'd');  // a few pages per key
    batch.keys.push_back(key);
    status = store->Apply(batch);
  }
  REQUIRE(status.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(status.message()), Catch::Contains("the disk is full"));
  // Starting on the full disk says so too: a store that exists opens, and its first write
  // (a server's start record) is refused as above; a new one cannot even take its lock.
  store.reset();
  store = OpenStore(volume + "/keys.db");
  WriteBatch start;
  start.settings["started"] = "yes";
  status = store->Apply(start);
  CHECK(status.code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(status.message()), Catch::Contains("the disk is full"));
  absl::StatusOr<std::unique_ptr<KeyStore>> other = KeyStore::Open(volume + "/other.db");
  CHECK(other.status().code() == absl::StatusCode::kUnavailable);
  CHECK_THAT(std::string(other.status().message()), Catch::Contains("the disk is full"));

  REQUIRE(::unlink((volume + "/filler").c_str()) == 0);
  WriteBatch batch;
  batch.keys.push_back(MakeKey(500));
  CHECK(store->Apply(batch).ok());
  CHECK(store->GetKey(IdFor(500)).ok());
}

}  // namespace
}  // namespace custos::storage
