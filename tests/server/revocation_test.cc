// RevocationList (the CRL loader) and PeerAuthenticator's per-call checks, over CAs,
// certificates and CRLs made in memory (tests/server/test_pki.h) and written to a temp dir.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <string>
#include <vector>

#include "common/clock.h"
#include "server/peer_identity.h"
#include "server/revocation.h"
#include "tests/server/test_pki.h"
#include "tests/support/temp_dir.h"

namespace custos::server {
namespace {

using custos::testing::TempDir;
using testing::CrlSpec;
using testing::LeafSpec;
using testing::TestCa;
using testing::WriteFile;

constexpr int64_t kNow = 1'800'000'000;  // 2027-01-15T08:00:00Z
constexpr int64_t kDay = 86400;
constexpr char kCaSubject[] = "CN=Custos Test CA,O=Custos tests";
constexpr char kApp[] = "spiffe://custos.local/app/demo";

// A CRL current at kNow revoking `revoked`.
CrlSpec Current(std::vector<long> revoked = {}) {
  return CrlSpec{std::move(revoked), kNow - kDay, kNow + kDay};
}

LeafSpec AppLeaf(long serial) {
  LeafSpec leaf;
  leaf.uri_sans = {kApp};
  leaf.serial = serial;
  leaf.not_before = kNow - 10 * kDay;
  leaf.not_after = kNow + 10 * kDay;
  return leaf;
}

// A client CA bundle and a CRL folder in a temp dir.
struct Pki {
  TempDir dir;
  TestCa ca{"Custos Test CA", kNow - 100 * kDay, kNow + 1000 * kDay};
  std::string bundle = dir.File("ca.crt");
  std::string crls = dir.File("crl");

  Pki() {
    WriteFile(bundle, ca.CertPem());
    REQUIRE(mkdir(crls.c_str(), 0755) == 0);
  }
  void PutCrl(const std::string& name, const std::string& crl) const {
    WriteFile(crls + "/" + name, crl);
  }
  absl::StatusOr<std::shared_ptr<const RevocationList>> Load(int64_t now = kNow) const {
    return RevocationList::Load(bundle, crls, now);
  }
};

void RequireLoadFails(const absl::StatusOr<std::shared_ptr<const RevocationList>>& lists,
                      const std::string& part) {
  INFO(lists.status().ToString());
  REQUIRE_FALSE(lists.ok());
  CHECK(lists.status().code() == absl::StatusCode::kFailedPrecondition);
  CHECK_THAT(std::string(lists.status().message()), Catch::Contains(part));
}

TEST_CASE("A current CRL for the client CA loads", "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current({0x1001, 0x1002})));
  pki.PutCrl("README", "CRLs of the Custos client CA\n");  // no CRL in it: skipped
  const auto lists = pki.Load();
  INFO(lists.status().ToString());
  REQUIRE(lists.ok());
  REQUIRE((*lists)->authorities().size() == 1);
  const RevocationList::Authority& ca = (*lists)->authorities().front();
  CHECK(ca.subject == kCaSubject);
  CHECK(ca.revoked.size() == 2);
  CHECK(ca.revoked.contains("1001"));
  CHECK((*lists)->Describe() ==
        "1 client CA, 2 revoked serials, next CRL update due " + FormatUtc(kNow + kDay));
}

TEST_CASE("A CRL in DER, or under an `openssl rehash` name, loads too", "[revocation]") {
  Pki pki;
  pki.PutCrl("1a2b3c4d.r0", pki.ca.CrlDer(Current({0x77})));
  const auto lists = pki.Load();
  INFO(lists.status().ToString());
  REQUIRE(lists.ok());
  CHECK((*lists)->authorities().front().revoked.contains("77"));
}

TEST_CASE("A CA without a CRL fails the load, naming the CA", "[revocation]") {
  Pki pki;
  RequireLoadFails(pki.Load(),
                   std::string("CA '") + kCaSubject + "' has no current CRL (none in the folder)");
  // A second CA in the bundle needs its own CRL too.
  TestCa second("Second CA", kNow - kDay, kNow + 1000 * kDay);
  WriteFile(pki.bundle, pki.ca.CertPem() + second.CertPem());
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current()));
  RequireLoadFails(pki.Load(), "CA 'CN=Second CA,O=Custos tests' has no current CRL");
  pki.PutCrl("second.crl.pem", second.Crl(Current()));
  CHECK(pki.Load().ok());
}

TEST_CASE("A missing CRL folder or CA bundle fails the load", "[revocation]") {
  Pki pki;
  RequireLoadFails(RevocationList::Load(pki.bundle, pki.dir.File("absent"), kNow),
                   "cannot read tls.crl_dir");
  RequireLoadFails(RevocationList::Load(pki.dir.File("absent.crt"), pki.crls, kNow),
                   "cannot read tls.client_ca");
  WriteFile(pki.bundle, "not a certificate\n");
  RequireLoadFails(pki.Load(), "holds no PEM certificate");
}

TEST_CASE("A CRL signed by another CA fails the load", "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current()));
  SECTION("another CA's own CRL") {
    TestCa other("Other CA", kNow - kDay, kNow + kDay);
    pki.PutCrl("other.crl.pem", other.Crl(Current()));
    RequireLoadFails(pki.Load(),
                     "is issued by 'CN=Other CA,O=Custos tests', which is not a CA "
                     "of tls.client_ca");
  }
  SECTION("a CRL in the client CA's name but signed with another key") {
    TestCa impostor("Custos Test CA", kNow - kDay, kNow + kDay);
    pki.PutCrl("forged.crl.pem", impostor.Crl(Current()));
    RequireLoadFails(pki.Load(), std::string("CA '") + kCaSubject + "': CRL " + pki.crls +
                                     "/forged.crl.pem has a bad signature");
  }
  SECTION("only a forged CRL: the CA has none either") {
    std::remove((pki.crls + "/ca.crl.pem").c_str());
    TestCa impostor("Custos Test CA", kNow - kDay, kNow + kDay);
    pki.PutCrl("forged.crl.pem", impostor.Crl(Current()));
    const auto lists = pki.Load();
    RequireLoadFails(lists, "has a bad signature");
    RequireLoadFails(lists, "has no current CRL");
  }
}

TEST_CASE("An expired or not yet valid CRL fails the load", "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl({{}, kNow - 2 * kDay, kNow - kDay}));
  RequireLoadFails(pki.Load(), std::string("CA '") + kCaSubject + "' has no current CRL: its CRL " +
                                   pki.crls + "/ca.crl.pem expired at " + FormatUtc(kNow - kDay));
  // nextUpdate itself is no longer current.
  pki.PutCrl("ca.crl.pem", pki.ca.Crl({{}, kNow - kDay, kNow}));
  RequireLoadFails(pki.Load(), "expired at " + FormatUtc(kNow));
  pki.PutCrl("ca.crl.pem", pki.ca.Crl({{}, kNow + 60, kNow + kDay}));
  RequireLoadFails(pki.Load(), "is not valid until " + FormatUtc(kNow + 60));
  pki.PutCrl("ca.crl.pem", pki.ca.Crl({{}, kNow - kDay, std::nullopt}));
  RequireLoadFails(pki.Load(), "has no nextUpdate");
  // An old CRL beside a current one is simply superseded.
  pki.PutCrl("ca.crl.pem", pki.ca.Crl({{}, kNow - 2 * kDay, kNow - kDay}));
  pki.PutCrl("ca-new.crl.pem", pki.ca.Crl(Current({5})));
  const auto lists = pki.Load();
  INFO(lists.status().ToString());
  REQUIRE(lists.ok());
  CHECK((*lists)->authorities().front().revoked.contains("05"));
}

TEST_CASE("The newest current CRL of a CA is the one in force", "[revocation]") {
  Pki pki;
  pki.PutCrl("a.pem", pki.ca.Crl({{0x10}, kNow - 2 * kDay, kNow + kDay}));
  pki.PutCrl("b.pem", pki.ca.Crl({{0x10, 0x11}, kNow - kDay, kNow + kDay}));
  const auto lists = pki.Load();
  REQUIRE(lists.ok());
  const RevocationList::Authority& ca = (*lists)->authorities().front();
  CHECK(ca.crl_file == pki.crls + "/b.pem");
  CHECK(ca.revoked.size() == 2);
}

TEST_CASE("A delta CRL is refused", "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current()));
  CrlSpec delta = Current({1});
  delta.delta = true;
  pki.PutCrl("delta.crl.pem", pki.ca.Crl(delta));
  RequireLoadFails(pki.Load(), "is a delta CRL");
}

// An authenticator on a clock the test moves.
struct Authenticator {
  ManualClock clock{kNow};
  PeerAuthenticator authenticator{&clock, 16};
};

void RequireRefused(const absl::StatusOr<std::string>& principal, const std::string& reason,
                    const std::string& pem) {
  INFO(principal.status().ToString());
  REQUIRE_FALSE(principal.ok());
  CHECK(principal.status().code() == absl::StatusCode::kUnauthenticated);
  CHECK(principal.status().message() ==
        reason + " (certificate sha256 " + CertificateSha256(pem) + ")");
}

TEST_CASE("A revoked certificate is refused at its next call, on new lists at once",
          "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current()));
  Authenticator a;
  REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  const std::string app = pki.ca.Issue(AppLeaf(0x1001));
  const std::string other = pki.ca.Issue(AppLeaf(0x1002));
  CHECK(a.authenticator.Authenticate(app).value() == kApp);  // now cached

  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current({0x1001})));
  CHECK(a.authenticator.Authenticate(app).ok());  // not reloaded yet
  const absl::StatusOr<std::string> loaded =
      a.authenticator.LoadRevocationList(pki.bundle, pki.crls);
  REQUIRE(loaded.ok());
  CHECK(*loaded == "1 client CA, 1 revoked serial, next CRL update due " + FormatUtc(kNow + kDay));
  RequireRefused(a.authenticator.Authenticate(app), "client certificate revoked (serial 1001)",
                 app);
  CHECK(a.authenticator.Authenticate(other).value() == kApp);

  // A reload that fails keeps the lists in force: still revoked, others still admitted.
  std::remove((pki.crls + "/ca.crl.pem").c_str());
  const absl::StatusOr<std::string> failed =
      a.authenticator.LoadRevocationList(pki.bundle, pki.crls);
  CHECK(failed.status().code() == absl::StatusCode::kFailedPrecondition);
  RequireRefused(a.authenticator.Authenticate(app), "client certificate revoked (serial 1001)",
                 app);
  CHECK(a.authenticator.Authenticate(other).ok());

  // Lists swapped in directly take effect at once too.
  a.authenticator.SetRevocationList(nullptr);
  CHECK(a.authenticator.Authenticate(app).ok());
}

TEST_CASE("Expiry is checked at every call, with or without CRLs", "[revocation]") {
  Pki pki;
  LeafSpec leaf = AppLeaf(0x2001);
  leaf.not_after = kNow + 60;
  const std::string app = pki.ca.Issue(leaf);
  Authenticator a;
  SECTION("without CRLs") {}
  SECTION("with CRLs") {
    pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current()));
    REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  }
  CHECK(a.authenticator.Authenticate(app).ok());
  a.clock.Advance(60);  // notAfter itself is still within the validity period
  CHECK(a.authenticator.Authenticate(app).ok());
  a.clock.Advance(1);
  RequireRefused(a.authenticator.Authenticate(app),
                 "client certificate expired at " + FormatUtc(kNow + 60), app);

  leaf.serial = 0x2002;
  leaf.not_before = kNow + 3600;
  leaf.not_after = kNow + 7200;
  const std::string early = pki.ca.Issue(leaf);
  RequireRefused(a.authenticator.Authenticate(early),
                 "client certificate not valid until " + FormatUtc(kNow + 3600), early);
}

TEST_CASE("A CRL that expires while in force refuses its CA's certificates", "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl({{}, kNow - kDay, kNow + 3600}));
  Authenticator a;
  REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  const std::string app = pki.ca.Issue(AppLeaf(0x3001));
  CHECK(a.authenticator.Authenticate(app).ok());
  a.clock.Advance(3600);
  RequireRefused(a.authenticator.Authenticate(app),
                 std::string("no current CRL for client CA '") + kCaSubject + "' (it expired at " +
                     FormatUtc(kNow + 3600) +
                     "); install a current CRL in tls.crl_dir and reload (SIGHUP)",
                 app);
  // A reload now fails too (no current CRL), and the refusal stays until a new CRL arrives.
  CHECK_FALSE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  pki.PutCrl("ca.crl.pem", pki.ca.Crl({{}, kNow + 3000, kNow + kDay}));
  REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  CHECK(a.authenticator.Authenticate(app).ok());
}

TEST_CASE("A certificate of a CA the lists do not know is refused", "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current()));
  Authenticator a;
  REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  // Same name, other key: told apart by the authority key identifier.
  for (const char* name : {"Custos Test CA", "Newer CA"}) {
    INFO(name);
    TestCa newer(name, kNow - kDay, kNow + kDay);
    const std::string app = newer.Issue(AppLeaf(0x4001));
    RequireRefused(a.authenticator.Authenticate(app),
                   "client certificate's issuer is no CA of tls.client_ca as last loaded, so no "
                   "CRL covers it (an intermediate CA missing from the bundle, or a CA added "
                   "since the last reload)",
                   app);
  }
}

TEST_CASE("Certificates of an intermediate CA its root revoked are refused", "[revocation]") {
  Pki pki;
  TestCa intermediate("Intermediate CA", kNow - kDay, kNow + 100 * kDay, &pki.ca, 0x55);
  WriteFile(pki.bundle, pki.ca.CertPem() + intermediate.CertPem());
  pki.PutCrl("intermediate.crl.pem", intermediate.Crl(Current()));
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current()));
  Authenticator a;
  REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  const std::string app = intermediate.Issue(AppLeaf(0x5001));
  CHECK(a.authenticator.Authenticate(app).ok());
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current({0x55})));
  REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  RequireRefused(a.authenticator.Authenticate(app),
                 "client certificate's issuing CA 'CN=Intermediate CA,O=Custos tests' is revoked",
                 app);
}

TEST_CASE("Identity refusals pass through the authenticator as UNAUTHENTICATED", "[revocation]") {
  Pki pki;
  Authenticator a;
  LeafSpec leaf = AppLeaf(0x6001);
  leaf.eku = "serverAuth";
  const std::string server = pki.ca.Issue(leaf);
  RequireRefused(a.authenticator.Authenticate(server),
                 "client certificate's extended key usage lacks clientAuth", server);
}

TEST_CASE("Without a crl_dir, revocation checking is off", "[revocation]") {
  Pki pki;
  pki.PutCrl("ca.crl.pem", pki.ca.Crl(Current({0x7001})));
  Authenticator a;
  REQUIRE(a.authenticator.LoadRevocationList(pki.bundle, pki.crls).ok());
  const std::string app = pki.ca.Issue(AppLeaf(0x7001));
  CHECK_FALSE(a.authenticator.Authenticate(app).ok());
  const absl::StatusOr<std::string> off = a.authenticator.LoadRevocationList(pki.bundle, "");
  REQUIRE(off.ok());
  CHECK_THAT(*off, Catch::StartsWith("revocation checking is off"));
  CHECK(a.authenticator.revocation_list() == nullptr);
  CHECK(a.authenticator.Authenticate(app).ok());
}

}  // namespace
}  // namespace custos::server
