// The archive file of an audit log archival (docs/AUDIT.md): the records from the live log's
// first up to a signed checkpoint, in the JSON Lines export format, followed by the signed
// checkpoints from the one the live log started after (if it had been archived before) up to
// that checkpoint. Such a file verifies on its own (`custosctl audit verify FILE`), and the
// archives of a log, in order, then the live log, verify as one log.
//
// Written beside the live database, never over an archive that was completed: to a temporary
// file, flushed, read back and verified under the HSM's public key (it must end exactly at the
// checkpoint, chained from where the live log starts), then renamed to `<name>.pending` and the
// directory flushed. Only then may the archival commit; once it has, the file takes its name
// (PublishAuditArchives), never over an existing file. An archival that does not commit thus
// leaves no file among the archives (`audit-*.jsonl`).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "audit/record.h"
#include "audit/verifier.h"
#include "common/status.h"
#include "storage/key_store.h"

namespace custos::storage {

struct AuditArchiveFile {
  std::string path;
  uint64_t first_seq = 0;  // the first record it holds
  uint64_t last_seq = 0;   // the checkpoint it ends with
  uint64_t checkpoints = 0;
  std::string sha256_hex;  // of the whole file, for the archival's record
};

// Writes and verifies the archive of `store`'s records from its floor up to `through` (a
// checkpoint stored in it, signed under `key`) into directory `dir` (created 0700 if missing),
// as audit-<first>-<last>.jsonl.pending (seqs zero-padded to 12 digits, so names sort by seq;
// `path` is the name without .pending), mode 0600. If that name is taken by the same bytes
// already, nothing is pending. FAILED_PRECONDITION if the log does not verify up to `through`,
// or a different file holds the name already; UNAVAILABLE if the file cannot be written.
absl::StatusOr<AuditArchiveFile> WriteAuditArchive(const KeyStore& store, const std::string& dir,
                                                   const audit::Checkpoint& through,
                                                   const audit::PublicKeyVerifier& key);

// Once the archival up to `floor` has committed (and at every start): the pending archive
// ending at `floor` takes its name; pending ones ending before it (attempts that did not
// commit, their records held by a committed archive) are removed. Returns the pending files
// left: ones past the floor (attempts that did not commit, their records still in the live
// log), or at the floor with a different file under their name.
absl::StatusOr<std::vector<std::string>> PublishAuditArchives(const std::string& dir,
                                                              uint64_t floor);

}  // namespace custos::storage
