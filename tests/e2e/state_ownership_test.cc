// One custosd per state, and readers of its live database that never disturb it: custosd
// keeps SQLite's locks on the -shm file, so an auditor verifying the live file (or any
// SQLite client) cannot reinitialise the shared memory under it; a second custosd on the same
// state stops before it touches anything; two servers never split one port.
#include <sqlite3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <catch2/catch.hpp>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "tests/e2e/e2e_util.h"
#include "tests/support/files.h"
#include "tests/support/temp_dir.h"

namespace custos::testing {
namespace {

// The POSIX locks process `pid` holds on `path`, from /proc/locks: "<READ|WRITE> <start>
// <end>" lines.
std::string PosixLocksOf(pid_t pid, const std::string& path) {
  struct stat st {};
  REQUIRE(::stat(path.c_str(), &st) == 0);
  std::string inode = ":";
  inode += std::to_string(st.st_ino);
  std::ifstream in("/proc/locks");
  std::string line, found;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string ordinal, kind, advisory, mode, owner, device, start, end;
    fields >> ordinal >> kind >> advisory >> mode >> owner >> device >> start >> end;
    if (kind == "POSIX" && owner == std::to_string(pid) && device.ends_with(inode)) {
      found += mode + " " + start + " " + end + "\n";
    }
  }
  return found;
}

// Stops `server` at a moment it holds no lock on its HSM token's files. Stopped inside a
// token write it would hold SoftHSM2's file lock, and every other process on the token would
// wait for it (a stall of the token itself, not of one holder): the copies below would then
// wait too, instead of judging the stopped server's claim.
void StopOutsideTokenWrites(const CustosServer& server) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    server.Signal(SIGSTOP);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));  // stopped by now
    bool locked = false;
    for (const auto& entry :
         std::filesystem::recursive_directory_iterator(server.state_dir() + "/hsm")) {
      if (entry.is_regular_file() && !PosixLocksOf(server.pid(), entry.path()).empty()) {
        locked = true;
      }
    }
    if (!locked) return;
    server.Signal(SIGCONT);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  FAIL("custosd held a lock on its HSM token at every stop");
}

TEST_CASE("Verifying the live database under load never disturbs custosd", "[e2e][state]") {
  CustosServer server;
  const std::string db = server.state_dir() + "/custos.db";
  // Like any SQLite connection, custosd holds its read lock on the -shm file (byte 128).
  CHECK_THAT(PosixLocksOf(server.pid(), db + "-shm"), Catch::Contains("READ 128 128"));

  CreateKey(server, "live/key", true, true);
  int code = 0;
  const std::string anchor = server.state_dir() + "/anchor";
  REQUIRE(Ctl(server, "auditor", "audit checkpoint --out-dir " + anchor).exit_code == 0);

  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, failed{0};
  std::vector<std::thread> apps;
  for (int t = 0; t < 8; ++t) {
    apps.emplace_back([&] {
      auto keys = server.Keys("app");
      pb::GenerateDataKeyRequest req;
      req.set_key("live/key");
      while (!stop) {
        pb::GenerateDataKeyResponse reply;
        (keys->GenerateDataKey(Context().get(), req, &reply).ok() ? ok : failed)++;
      }
    });
  }
  // An auditor verifies the live file every quarter second, and a plain SQLite client opens
  // and closes it in between, as the sqlite3 shell or a backup tool would.
  const std::string verify = std::string(CUSTOSCTL_PATH) + " audit verify --db " + db +
                             " --public-key " + anchor + "/audit-public.pem 2>&1";
  int verified = 0;
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(8);
  while (std::chrono::steady_clock::now() < until && server.Alive()) {
    const std::string report = RunCommand(verify, &code);
    INFO(report);
    CHECK(code == 0);
    verified += code == 0;
    sqlite3* reader = nullptr;
    REQUIRE(sqlite3_open_v2(db.c_str(), &reader, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK);
    CHECK(sqlite3_exec(reader, "SELECT count(*) FROM audit_log", nullptr, nullptr, nullptr) ==
          SQLITE_OK);
    sqlite3_close(reader);
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
  }
  stop = true;
  for (std::thread& t : apps) t.join();
  INFO(server.Log());
  REQUIRE(server.Alive());
  CHECK(failed == 0);
  CHECK(ok > 100);
  CHECK(verified >= 10);
  CHECK_THAT(PosixLocksOf(server.pid(), db + "-shm"), Catch::Contains("READ 128 128"));
}

TEST_CASE("A second custosd on the same state exits naming the first, which keeps serving",
          "[e2e][state]") {
  CustosServer server;
  CreateKey(server, "owned/key", true, true);
  std::string output;
  const int status =
      RunCustosd("--config " + server.state_dir() + "/custosd.toml", &output, /*timeout=*/20);
  INFO(output);
  CHECK(status == 1);
  CHECK_THAT(output, Catch::Contains("in use by another process (pid " +
                                     std::to_string(server.pid()) + ","));
  // `init` on a served state is refused the same way rather than racing the server.
  CHECK(RunCustosd("--config " + server.state_dir() + "/custosd.toml init", &output) == 1);

  // The first server never noticed: its calls and its audit chain carry on.
  pb::GenerateDataKeyRequest req;
  req.set_key("owned/key");
  pb::GenerateDataKeyResponse reply;
  REQUIRE(server.Keys("app")->GenerateDataKey(Context().get(), req, &reply).ok());
  const std::string anchor = server.state_dir() + "/anchor";
  REQUIRE(Ctl(server, "auditor", "audit checkpoint --out-dir " + anchor).exit_code == 0);
  int code = 0;
  const std::string report =
      RunCommand(std::string(CUSTOSCTL_PATH) + " audit verify --db " + server.state_dir() +
                     "/custos.db --public-key " + anchor + "/audit-public.pem --anchor " + anchor +
                     "/checkpoint.json 2>&1",
                 &code);
  INFO(report);
  CHECK(code == 0);
}

// As root on the host could, or a clean-up script gone wrong: the -wal file deleted while
// custosd runs. What it committed after would go into a file nobody reads again; it refuses
// instead, and no call it answered OK is missing from the log after a restart.
TEST_CASE("A database file deleted under load takes no acknowledged call with it", "[e2e][state]") {
  CustosServer server;
  CreateKey(server, "unlinked/key", true, true);
  const auto acknowledged_records = [&] {
    size_t n = 0;
    for (const pb::AuditRecord& r : AuditRecords(server)) {
      n += r.action() == "GenerateDataKey" && r.outcome() == "OK";
    }
    return n;
  };
  const size_t before = acknowledged_records();
  const std::string wal = server.state_dir() + "/custos.db-wal";
  std::atomic<bool> stop{false};
  std::atomic<int> ok{0}, refused{0}, other{0};
  std::string other_status;  // the first unexpected answer
  std::mutex other_mu;
  std::vector<std::thread> apps;
  struct Joiner {  // a failed REQUIRE below must not leave the callers running
    Joiner(std::atomic<bool>& s, std::vector<std::thread>& t) : stop(s), threads(t) {}
    Joiner(const Joiner&) = delete;
    Joiner& operator=(const Joiner&) = delete;
    std::atomic<bool>& stop;
    std::vector<std::thread>& threads;
    ~Joiner() {
      stop = true;
      for (std::thread& t : threads) t.join();
    }
  };
  std::optional<Joiner> joiner;
  joiner.emplace(stop, apps);
  for (int t = 0; t < 4; ++t) {
    apps.emplace_back([&] {
      auto keys = server.Keys("app");
      pb::GenerateDataKeyRequest req;
      req.set_key("unlinked/key");
      while (!stop) {
        pb::GenerateDataKeyResponse reply;
        const grpc::Status status = keys->GenerateDataKey(Context().get(), req, &reply);
        if (status.ok()) {
          ++ok;
        } else if (status.error_code() == grpc::StatusCode::UNAVAILABLE &&
                   status.error_message().find("the key database file '" + wal +
                                               "' was deleted while open") != std::string::npos) {
          ++refused;
        } else if (++other == 1) {
          std::lock_guard lock(other_mu);
          other_status = std::to_string(status.error_code()) + " " + status.error_message();
        }
      }
    });
  }
  // Until `count` reaches `n`, or 20 s have passed.
  const auto await_count = [&](const std::atomic<int>& count, int n) {
    for (int i = 0; i < 2000 && count < n && other == 0; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    std::lock_guard lock(other_mu);
    INFO(other_status);
    REQUIRE(count >= n);
  };
  await_count(ok, 200);
  REQUIRE(::unlink(wal.c_str()) == 0);
  AwaitLine([&] { return server.Log(); },
            "[warning] health: NOT_SERVING: UNAVAILABLE: key database: the key database file '" +
                wal + "' was deleted while open");
  await_count(refused, 100);
  joiner.reset();
  INFO(server.Log());
  CHECK(other == 0);
  CHECK(Occurrences(server.Log(),
                    "[error] key database writes failing: UNAVAILABLE: the key "
                    "database file '" +
                        wal + "' was deleted while open") == 1);

  // Even killed: what the deleted WAL held was checkpointed into the database when the
  // deletion was found, so every call answered OK is in the log the restarted server reads,
  // and it serves again.
  // (The group committed as the file went may be recorded too, though its callers were told
  // UNAVAILABLE, as after a crash between commit and answer: one caller's call each at most.)
  server.CrashAndRestart();
  const size_t recorded = acknowledged_records() - before;
  CHECK(recorded >= static_cast<size_t>(ok));
  CHECK(recorded <= static_cast<size_t>(ok) + apps.size());
  pb::GenerateDataKeyRequest req;
  req.set_key("unlinked/key");
  pb::GenerateDataKeyResponse reply;
  CHECK(server.Keys("app")->GenerateDataKey(Context().get(), req, &reply).ok());
}

// How a claim names `server`: "<host>:<pid>".
std::string HolderOf(const CustosServer& server) {
  char host[256] = {};
  REQUIRE(::gethostname(host, sizeof(host) - 1) == 0);
  return std::string(host) + ":" + std::to_string(server.pid());
}

// `server`'s state folder copied into `to` (emptied first), as an operator would copy it, less
// the port file and the log.
void CopyState(const CustosServer& server, const std::string& to) {
  REQUIRE(std::system(("rm -rf " + to + "/* && cp -a " + server.state_dir() + "/. " + to +
                       "/ && rm -f " + to + "/port " + to + "/custosd.log")
                          .c_str()) == 0);
}

// A copy of the state folder, started by mistake, shares the original's HSM token (its
// softhsm2.conf names the original's token directory) but not its lock file: the token itself
// says which server holds it. Two servers on one token would fork the audit log.
TEST_CASE("A second custosd on the same HSM token waits out the first's claim, or stops",
          "[e2e][state]") {
  CustosServer server;
  CreateKey(server, "claimed/key", true, true);
  TempDir copy;
  CopyState(server, copy.path());
  const std::string run_copy = "--config " + copy.path() + "/custosd.toml";
  const std::string holder = HolderOf(server);

  // While the first renews its claim, the copy stops before it writes anything.
  std::string output;
  auto start = std::chrono::steady_clock::now();
  int status = RunCustosd(run_copy, &output, /*timeout=*/30);
  INFO(output);
  CHECK(status == 72);
  CHECK_THAT(output, Catch::Contains("another custosd (" + holder +
                                     ") holds this HSM token: it renewed its claim while this "
                                     "one waited. Two servers on one token would fork the audit "
                                     "log"));
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));  // the lease
  pb::GenerateDataKeyRequest req;
  req.set_key("claimed/key");
  pb::GenerateDataKeyResponse reply;
  CHECK(server.Keys("app")->GenerateDataKey(Context().get(), req, &reply).ok());

  // The first stalls for longer than a lease. The copy, made before the call above, does not
  // reach the record the first's last renewal named: it is refused, and the first, running
  // again, keeps the token.
  std::this_thread::sleep_for(std::chrono::seconds(2));  // renewed since the call
  StopOutsideTokenWrites(server);
  status = RunCustosd(run_copy, &output, /*timeout=*/30);
  server.Signal(SIGCONT);
  CHECK(status == 72);
  CHECK_THAT(output, Catch::Contains("the HSM token's last holder (" + holder +
                                     ") stopped without releasing it, and has not renewed its "
                                     "claim for 5000 ms; taking the token over"));
  CHECK_THAT(output, Catch::Contains("FAILED_PRECONDITION: the HSM token's last holder (" + holder +
                                     ") had written the audit log to record "));
  CHECK_THAT(output, Catch::Contains("which this database does not reach (it ends at record "));
  std::this_thread::sleep_for(std::chrono::seconds(2));  // a health round or two
  REQUIRE(server.Alive());
  CHECK(server.Keys("app")->GenerateDataKey(Context().get(), req, &reply).ok());

  // A copy made while the first is stalled holds all it wrote: it takes the token over, and
  // the first, running again, finds its claim gone and exits.
  StopOutsideTokenWrites(server);
  CopyState(server, copy.path());
  std::thread copy_runs([&] { status = RunCustosd(run_copy, &output, /*timeout=*/12); });
  std::this_thread::sleep_for(std::chrono::seconds(9));
  server.Signal(SIGCONT);
  CHECK(server.WaitForExit(std::chrono::seconds(3)) == 71);
  copy_runs.join();
  CHECK(status == 128 + SIGKILL);  // served until RunCustosd's timeout
  CHECK_THAT(output, Catch::Contains("taking the token over"));
  CHECK_THAT(output, Catch::Contains("custosd listening on"));
  CHECK_THAT(server.Log(), Catch::Contains("[critical] another custosd ("));
  CHECK_THAT(server.Log(), Catch::Contains(") took this HSM token over while this one did not "
                                           "renew its claim for a lease; exiting (code 71)"));
}

// init writes to the token too (the keys its config names that the token lacks): on a copy
// of the state it ran beside the server holding the token, and created keys under it.
TEST_CASE("init on a copy of the state waits for the token like a start, and writes nothing",
          "[e2e][state]") {
  CustosServer server;
  CreateKey(server, "init/key", true, true);
  TempDir copy;
  CopyState(server, copy.path());
  // The copy's config names an audit key the token lacks: init would create it.
  REQUIRE(std::system(("sed -i 's|^pin_file = \"hsm/pin\"$|&\\naudit_hmac_key_label = "
                       "\"copy-audit-hmac\"|' " +
                       copy.path() + "/custosd.toml")
                          .c_str()) == 0);
  REQUIRE_THAT(
      ReadFile(copy.path() + "/custosd.toml"),
      Catch::Contains("pin_file = \"hsm/pin\"\naudit_hmac_key_label = \"copy-audit-hmac\"\n"));
  const std::string init_copy = "--config " + copy.path() + "/custosd.toml init";
  const std::string holder = HolderOf(server);

  std::string output;
  int status = RunCustosd(init_copy, &output, /*timeout=*/30);
  {
    INFO(output);
    CHECK(status == 72);
    CHECK_THAT(output, Catch::Contains("another custosd (" + holder + ") holds this HSM token"));
    CHECK_THAT(output, !Catch::Contains("created"));
    CHECK_THAT(output, !Catch::Contains("nothing to do"));
  }
  pb::GenerateDataKeyRequest req;
  req.set_key("init/key");
  pb::GenerateDataKeyResponse reply;
  CHECK(server.Keys("app")->GenerateDataKey(Context().get(), req, &reply).ok());

  // Once the server has stopped (and released the token), init runs.
  server.Stop();
  status = RunCustosd(init_copy, &output, /*timeout=*/30);
  INFO(output);
  CHECK(status == 0);
  CHECK_THAT(output, Catch::Contains("created audit HMAC key 'copy-audit-hmac'"));
  CHECK_THAT(output, Catch::Contains("catalogue HMAC key"));
  CHECK_THAT(output, Catch::Contains("already exists"));
}

TEST_CASE("Two servers never share a port", "[e2e][state]") {
  CustosServer first;
  CustosServer second;
  const int port = FreeLoopbackPort();
  first.Stop();
  first.EditConfig("127.0.0.1:0", "127.0.0.1:" + std::to_string(port));
  first.Start();
  second.Stop();
  second.EditConfig("127.0.0.1:0", "127.0.0.1:" + std::to_string(port));
  std::string output;
  const int status = RunCustosd("--config " + second.state_dir() + "/custosd.toml", &output);
  INFO(output);
  CHECK(status == 1);
  CHECK_THAT(output, Catch::Contains("cannot listen on 127.0.0.1:" + std::to_string(port)));
  CHECK(first.Alive());
}

}  // namespace
}  // namespace custos::testing
