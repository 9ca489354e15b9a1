// The catalogue's rows as its integrity checks see them: a name that says which row it is, and
// a canonical encoding of everything in it that decides who may do what.
//
// Each row that decides who may do what (a key with its versions, grants and lifecycle state,
// a dual-control request with its approvals, a version's encryption reservation, a
// server-wide setting) is stored with a MAC, under a key the database cannot reach (an HSM
// key; see RowAuthenticator), of its canonical encoding, which starts with the row's name: a
// row can be neither forged nor moved to another key. Every change of such a row is also
// recorded in the audit log by a record naming the row and carrying the SHA-256 of its
// encoding, so the hash-chained log says which version of the row is current: a row rolled
// back to an older (genuine, MAC'd) version is caught too.
//
// The encoding: the magic "custos-row-v1", then each field as a u32 big-endian length and
// its bytes (integers as decimal text, sets and maps as a count then their elements in order).
// A field added later is appended only when it holds something (a key's reserved versions),
// so a row written before it existed encodes, and verifies, as it did.
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "common/secure_bytes.h"
#include "common/status.h"
#include "storage/key_store.h"

namespace custos::storage {

std::string KeyRowName(std::string_view key_id);                      // "key:<id>"
std::string RequestRowName(std::string_view request_id);              // "request:<id>"
std::string UsageRowName(std::string_view key_id, uint32_t version);  // "usage:<id>/<version>"
std::string SettingRowName(std::string_view name);                    // "setting:<name>"

Bytes CanonicalKeyRow(const KeyRecord& key);
Bytes CanonicalRequestRow(const RequestRecord& request);
// Only what guards encryption: the reservation. Counts and last use inform officers, guard
// nothing, and change without a record.
Bytes CanonicalUsageRow(const VersionUsage& usage);
Bytes CanonicalSettingRow(std::string_view name, std::string_view value);

// Lower-case hex SHA-256 of a canonical encoding: what audit records carry as row_digest.
std::string RowDigest(std::span<const uint8_t> canonical);

}  // namespace custos::storage
