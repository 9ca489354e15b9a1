// Helpers shared by the KeyStore tests: sample records, opening stores, and reading the
// database file over a separate connection.
#pragma once

#include <sqlite3.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>  // setenv
#include <memory>
#include <string>
#include <utility>

#include <catch2/catch.hpp>

#include "storage/key_store.h"

namespace custos::storage::test {

// Every commit here is fsync'd: ~3 ms on disk, free on tmpfs, so the 100k-key test would take
// minutes on disk. What the tests check (what a fresh connection reads back from the file) is
// the same on both, so this binary keeps its temporary databases on tmpfs when there is one.
[[maybe_unused]] inline const bool kOnTmpfs = [] {
  return ::access("/dev/shm", W_OK) == 0 && ::setenv("TMPDIR", "/dev/shm", 1) == 0;
}();

inline std::string IdFor(int n) {
  char id[40];
  std::snprintf(id, sizeof(id), "00000000-0000-4000-8000-%012d", n);
  return id;
}

inline KeyRecord MakeKey(int n, std::string alias = "") {
  KeyRecord key;
  key.id = IdFor(n);
  key.alias = std::move(alias);
  key.description = "key number " + std::to_string(n);
  key.tags = {{"team", "billing"}, {"env", "prod"}};
  key.state = KeyState::kEnabled;
  key.created_at = 1700000000 + n;
  key.created_by = "spiffe://custos.local/officer/alice";
  key.primary_version = 2;
  // Out of order on purpose: the store keeps versions ascending.
  key.versions = {{2, Bytes{9, 8, 7, 0, 255}, "root-2", 1700000100},
                  {1, Bytes{1, 2, 3, 4, 5, 6, 7, 8}, "root-1", 1700000000}};
  key.encrypt_grants = {"spiffe://custos.local/app/billing"};
  key.decrypt_grants = {"spiffe://custos.local/app/billing", "spiffe://custos.local/app/reports"};
  return key;
}

// An audit record of `action` by an app, outcome OK, for batches the store seals into the log.
inline audit::Record AuditEvent(const std::string& action) {
  audit::Record row;
  row.time = 1800000000;
  row.principal = "spiffe://t/app/a";
  row.role = "app";
  row.action = action;
  row.outcome = "OK";
  return row;
}

// A key with the least the store needs, for bulk tests.
inline KeyRecord MakeSmallKey(int n) {
  KeyRecord key;
  key.id = IdFor(n);
  key.versions = {{1, Bytes(40, 0xab), "root", 1}};
  key.primary_version = 1;
  return key;
}

inline void CheckSameKey(const KeyRecord& got, const KeyRecord& want) {
  CHECK(got.id == want.id);
  CHECK(got.alias == want.alias);
  CHECK(got.description == want.description);
  CHECK(got.tags == want.tags);
  CHECK(got.state == want.state);
  CHECK(got.created_at == want.created_at);
  CHECK(got.created_by == want.created_by);
  CHECK(got.primary_version == want.primary_version);
  CHECK(got.min_decrypt_version == want.min_decrypt_version);
  CHECK(got.rotation_period_seconds == want.rotation_period_seconds);
  CHECK(got.deletion_due_at == want.deletion_due_at);
  CHECK(got.destroyed_at == want.destroyed_at);
  REQUIRE(got.versions.size() == want.versions.size());
  for (const KeyVersion& v : want.versions) {
    const KeyVersion* found = got.FindVersion(v.version);
    REQUIRE(found != nullptr);
    CHECK(found->wrapped == v.wrapped);
    CHECK(found->root_key_label == v.root_key_label);
    CHECK(found->created_at == v.created_at);
  }
  for (size_t i = 1; i < got.versions.size(); ++i) {
    CHECK(got.versions[i - 1].version < got.versions[i].version);
  }
  CHECK(got.encrypt_grants == want.encrypt_grants);
  CHECK(got.decrypt_grants == want.decrypt_grants);
}

inline std::unique_ptr<KeyStore> OpenStore(const std::string& path) {
  auto store = KeyStore::Open(path);
  INFO(store.status().ToString());
  REQUIRE(store.ok());
  return std::move(store).value();
}

// Closes `store` and opens its file again, as a restart would: one store per file at a time
// (the second would be refused). Returns `store`, now the reopened one.
inline std::unique_ptr<KeyStore>& Reopen(std::unique_ptr<KeyStore>& store,
                                         const std::string& path) {
  store.reset();
  store = OpenStore(path);
  return store;
}

// Runs a one-value query on a separate connection, straight on the file.
inline std::string QueryFile(const std::string& path, const std::string& sql) {
  sqlite3* db = nullptr;
  REQUIRE(sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE, nullptr) == SQLITE_OK);
  sqlite3_stmt* stmt = nullptr;
  REQUIRE(sqlite3_prepare_v2(db, sql.c_str(), -1, &stmt, nullptr) == SQLITE_OK);
  std::string value;
  if (sqlite3_step(stmt) == SQLITE_ROW && sqlite3_column_text(stmt, 0) != nullptr) {
    value = reinterpret_cast<const char*>(sqlite3_column_text(stmt, 0));
  }
  sqlite3_finalize(stmt);
  sqlite3_close(db);
  return value;
}

// "table=rows " for the key tables, as of the file.
inline std::string RowCounts(const std::string& path) {
  std::string counts;
  for (const char* table : {"keys", "key_tags", "key_versions", "key_grants"}) {
    counts += std::string(table) + "=" +
              QueryFile(path, std::string("SELECT count(*) FROM ") + table) + " ";
  }
  return counts;
}

// The same for every table, with a checksum of their contents, so that a refused write can
// be shown to have changed nothing at all.
inline std::string Snapshot(const std::string& path) {
  std::string snapshot = RowCounts(path);
  for (const char* table : {"requests", "request_approvals", "version_usage"}) {
    snapshot += std::string(table) + "=" +
                QueryFile(path, std::string("SELECT count(*) FROM ") + table) + " ";
  }
  // Every column of every row, in a fixed order.
  snapshot += QueryFile(
      path,
      "SELECT group_concat(r, '|') FROM ("
      " SELECT quote(id) || quote(alias) || description || state || created_at || created_by ||"
      " primary_version || min_decrypt_version || rotation_period_seconds || deletion_due_at ||"
      " destroyed_at AS r FROM keys"
      " UNION ALL SELECT key_id || name || value FROM key_tags"
      " UNION ALL SELECT key_id || version || hex(wrapped) || root_key_label || created_at"
      " FROM key_versions"
      " UNION ALL SELECT key_id || principal || use FROM key_grants"
      " UNION ALL SELECT id || operation || quote(key_id) || parameters || justification ||"
      " proposer || created_at || expires_at || state || rejected_by || reason || closed_at"
      " FROM requests"
      " UNION ALL SELECT request_id || principal || at || ordinal FROM request_approvals"
      " UNION ALL SELECT key_id || version || encryptions_reserved || encryptions ||"
      " decryptions || last_used_at FROM version_usage"
      " ORDER BY 1)");
  return snapshot;
}

}  // namespace custos::storage::test
