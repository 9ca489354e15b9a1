// What the operator's log says while every call fails: the HSM failing (through the fault
// module) and the disk holding the database filling up. Each failure is logged once when it
// starts and once when it clears, never once per call; a full disk is called a full disk.
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include "tests/e2e/e2e_util.h"
#include "tests/support/files.h"

namespace custos::testing {
namespace {

grpc::Status GenerateDataKey(CustosServer& server, const std::string& alias) {
  pb::GenerateDataKeyRequest req;
  req.set_key(alias);
  pb::GenerateDataKeyResponse reply;
  return server.Keys("app")->GenerateDataKey(Context().get(), req, &reply);
}

TEST_CASE("An HSM failing is logged when it starts and when it clears, not per call",
          "[e2e][failure_log]") {
  CustosServer server(ServerOptions{.extra_config = "", .fault_module = true});
  CreateKey(server, "flaky/key", true, true);
  server.SetFaults("* CKR_DEVICE_ERROR\n");
  for (int i = 0; i < 20; ++i) {
    const grpc::Status status = GenerateDataKey(server, "flaky/key");
    CHECK(status.error_code() == grpc::StatusCode::UNAVAILABLE);
  }
  server.SetFaults("");
  REQUIRE(GenerateDataKey(server, "flaky/key").ok());
  const std::string log = server.Log();
  INFO(log);
  CHECK(Occurrences(log, "[error] HSM failing: UNAVAILABLE: PKCS#11 ") == 1);
  CHECK(Occurrences(log, "[info] HSM working again after ") == 1);
  CHECK(Occurrences(log, "CKR_DEVICE_ERROR") < 5);  // not a line per failed call
}

TEST_CASE("A PKCS#11 call that does not return is logged as an HSM stall, and its end",
          "[e2e][failure_log]") {
  CustosServer server(ServerOptions{.extra_config = "", .fault_module = true});
  CreateKey(server, "stuck/key", true, true);
  server.SetFaults("C_GenerateRandom hang\n");
  std::thread caller([&] {
    pb::GenerateDataKeyRequest req;
    req.set_key("stuck/key");
    pb::GenerateDataKeyResponse reply;
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    // Answered at hsm.call_timeout_ms; the call itself stays inside the module.
    const grpc::Status status = server.Keys("app")->GenerateDataKey(&context, req, &reply);
    CHECK(status.error_code() == grpc::StatusCode::UNAVAILABLE);
    CHECK(status.error_message() ==
          "the HSM did not answer GenerateDataKey within 2000 ms (hsm.call_timeout_ms); retry "
          "later");
  });
  auto await = [&](const std::string& line) {
    for (int i = 0; i < 200 && server.Log().find(line) == std::string::npos; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    INFO(server.Log());
    REQUIRE(server.Log().find(line) != std::string::npos);
  };
  await("[error] HSM stalled: a PKCS#11 call has not returned for 2 s");
  // The hang is held until the call is answered: the stall logged may be the health probe's,
  // which draws random bytes too, before the call has reached the module.
  caller.join();
  server.SetFaults("");
  await("[info] HSM stall over after ");
  CHECK(Occurrences(server.Log(), "HSM stalled") == 1);
}

TEST_CASE("A full disk is logged as one, and the server recovers when space is freed",
          "[e2e][failure_log]") {
  CustosServer server;
  server.Stop();
  // The database on a small volume of its own (a tmpfs; CI runs as root).
  const std::string volume = server.state_dir() + "/volume";
  REQUIRE(::mkdir(volume.c_str(), 0700) == 0);
  INFO("mount: " << std::strerror(errno));
  REQUIRE(::mount("tmpfs", volume.c_str(), "tmpfs", 0, "size=2m,mode=0700") == 0);
  struct Unmount {
    std::string at;
    ~Unmount() { ::umount2(at.c_str(), MNT_DETACH); }
  } unmount{volume};
  // The database moves there as it is (a fresh one would not extend the audit log the HSM
  // has signed, and custosd would rightly refuse it).
  for (const char* file : {"custos.db", "custos.db-wal"}) {
    const std::string from = server.state_dir() + "/" + file;
    if (::access(from.c_str(), F_OK) == 0) {
      std::filesystem::copy_file(from, volume + "/" + file);
    }
  }
  server.EditConfig("path = \"custos.db\"", "path = \"volume/custos.db\"");
  server.Start();
  CreateKey(server, "full/key", true, true);
  REQUIRE(GenerateDataKey(server, "full/key").ok());

  {  // Someone else fills the volume.
    std::ofstream filler(volume + "/filler", std::ios::binary);
    const std::string block(64 * 1024, 'x');
    while (filler.write(block.data(), block.size())) {
    }
  }
  grpc::Status status;
  for (int i = 0; i < 200 && status.ok(); ++i) status = GenerateDataKey(server, "full/key");
  REQUIRE(status.error_code() == grpc::StatusCode::UNAVAILABLE);
  CHECK_THAT(status.error_message(), Catch::Contains("the disk is full"));
  for (int i = 0; i < 20; ++i) {
    CHECK(GenerateDataKey(server, "full/key").error_code() == grpc::StatusCode::UNAVAILABLE);
  }

  REQUIRE(::unlink((volume + "/filler").c_str()) == 0);
  CHECK(GenerateDataKey(server, "full/key").ok());
  const std::string log = server.Log();
  INFO(log);
  CHECK(Occurrences(log, "[error] key database writes failing: ") == 1);
  CHECK(Occurrences(log, "the disk is full") == 1);
  CHECK(Occurrences(log, "[info] key database writes working again after ") == 1);
  CHECK(server.Alive());
}

}  // namespace
}  // namespace custos::testing
