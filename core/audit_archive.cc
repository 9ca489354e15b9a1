// Audit log archival: the records up to a signed checkpoint move to a verified archive file
// and leave the live database, under dual control; and the start-up check of where the live
// log starts (docs/AUDIT.md, "Archiving the log").
#include "storage/audit_archive.h"
#include "absl/strings/numbers.h"
#include "audit/verifier.h"
#include "common/strings.h"
#include "core/call.h"
#include "core/kms.h"
#include "spdlog/spdlog.h"
#include "storage/row_codec.h"

namespace custos::core {
namespace {

using storage::AuditFloor;
using storage::RequestState;

// The archival floor as custosd sealed it ("<seq> <hex hash>"), vouched for by the
// ArchiveAuditLog record that set it. The database's audit_archived table, which the triggers
// read, must agree with it.
constexpr char kAuditFloorSetting[] = "audit_floor";
// Catalogue rows carried forward per transaction before an archival.
constexpr size_t kCarryPage = 1000;
// Archived records removed per transaction (a few ms of the store's lock), and per
// maintenance turn.
constexpr size_t kRemovalSlice = 5000;
constexpr size_t kRemovalSlicesPerTurn = 100;

std::string EncodeFloor(const AuditFloor& floor) {
  return StrCat(floor.seq, " ", audit::ToHex(floor.hash));
}

absl::StatusOr<AuditFloor> DecodeFloor(const std::string& text) {
  AuditFloor floor;
  const size_t space = text.find(' ');
  absl::StatusOr<Bytes> hash = space == std::string::npos
                                   ? absl::StatusOr<Bytes>(absl::InvalidArgumentError(""))
                                   : audit::FromHex(text.substr(space + 1));
  if (!hash.ok() || hash->size() != audit::kHashBytes ||
      !absl::SimpleAtoi(text.substr(0, space), &floor.seq) || floor.seq == 0) {
    return absl::DataLossError("the sealed audit archival floor is malformed");
  }
  floor.hash = *std::move(hash);
  return floor;
}

std::string Records(uint64_t from, uint64_t to) {
  return from == to ? StrCat("record ", from) : StrCat("records ", from, " to ", to);
}

// The checkpoint stored at `seq`; NOT_FOUND if none is.
absl::StatusOr<audit::Checkpoint> StoredCheckpointAt(const storage::KeyStore& store, uint64_t seq) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<audit::Checkpoint> found, store.ReadCheckpoints(seq, 1));
  if (found.empty() || found[0].seq != seq) {
    return absl::NotFoundError(StrCat("no signed checkpoint is stored at record ", seq,
                                      " (`custosctl audit checkpoint` shows the latest)"));
  }
  return std::move(found[0]);
}

}  // namespace

absl::Status Kms::CheckArchiveProposal(uint64_t through) const {
  if (through == 0) {
    return absl::InvalidArgumentError(
        "ArchiveAuditLog needs archive_through: the seq of a stored signed checkpoint");
  }
  CUSTOS_ASSIGN_OR_RETURN(const AuditFloor floor, options_.store->AuditLogFloor());
  if (through <= floor.seq) {
    return absl::FailedPreconditionError(StrCat("records up to ", floor.seq,
                                                " are archived already; the live log starts at ",
                                                floor.seq + 1));
  }
  // An archive that starts after an earlier archival holds the record of that archival (the
  // verifier wants it, so that a log cut at a checkpoint is not taken for an archived one).
  CUSTOS_ASSIGN_OR_RETURN(
      const uint64_t recorded,
      options_.store->LastRecordNaming(storage::SettingRowName(kAuditFloorSetting)));
  if (floor.seq > 0 && through < recorded) {
    return absl::FailedPreconditionError(
        StrCat("archive up to a checkpoint at or after record ", recorded,
               " (the record of the last archival), not ", through));
  }
  return StoredCheckpointAt(*options_.store, through).status();
}

absl::StatusOr<Request> Kms::ArchiveAudit(Call& call, Request request, uint64_t through) {
  // What could not succeed on a retry closes the request; an unreachable HSM or disk leaves
  // it pending, and the approval can be given again.
  const auto fail = [&](const absl::Status& status) -> absl::StatusOr<Request> {
    if (absl::IsUnavailable(status)) return status;
    return CloseFailed(call, std::move(request), status);
  };
  if (options_.audit_archive_dir.empty()) {
    return fail(absl::FailedPreconditionError("no audit archive directory is configured"));
  }
  if (absl::Status valid = CheckArchiveProposal(through); !valid.ok()) return fail(valid);
  CUSTOS_ASSIGN_OR_RETURN(const audit::Checkpoint checkpoint,
                          StoredCheckpointAt(*options_.store, through));
  CUSTOS_ASSIGN_OR_RETURN(const std::string pem,
                          options_.hsm->PublicKeyPem(options_.audit_signing_key_label));
  CUSTOS_ASSIGN_OR_RETURN(const audit::PublicKeyVerifier key,
                          audit::PublicKeyVerifier::FromPem(pem));
  if (!key.Verify(checkpoint)) {
    return fail(absl::FailedPreconditionError(
        StrCat("the checkpoint stored at ", through, " is not signed by this HSM's audit key")));
  }
  // The archive first, written and read back verified: nothing is removed that is not in it.
  const absl::StatusOr<storage::AuditArchiveFile> archive =
      storage::WriteAuditArchive(*options_.store, options_.audit_archive_dir, checkpoint, key);
  if (!archive.ok()) return fail(archive.status());
  // A row is believed only if the newest record naming it carries its digest; rows whose
  // newest record is about to be archived get a record in the live log carrying that digest.
  std::vector<audit::Event> page;  // the carried records of the page being written
  const storage::CarryRecord carry = [this, through, &page](const std::string& row, uint64_t seq) {
    audit::Event event = ServerEvent(
        "CarryRowRecord", "", "", absl::StatusCode::kOk,
        StrCat("carried forward from record ", seq, ": records up to ", through, " are archived"));
    if (row.rfind("key:", 0) == 0) event.key_id = row.substr(4);
    if (row.rfind("request:", 0) == 0) event.request_id = row.substr(8);
    event.row = row;
    page.push_back(event);
    return audit::RecordFromEvent(event, 0);
  };
  std::string carried_through;  // the last row name carried: each page goes on from there
  for (;;) {
    page.clear();
    absl::StatusOr<size_t> carried =
        options_.store->CarryForwardRowRecords(through, carry, kCarryPage, carried_through);
    if (!carried.ok()) return fail(carried.status());
    Committed(page);
    if (*carried == 0) break;
  }
  const AuditFloor floor{through, checkpoint.hash};
  const std::string archived_range = Records(archive->first_seq, archive->last_seq);
  request.state = RequestState::kExecuted;
  request.closed_at = options_.clock->NowSeconds();
  request.reason = StrCat("audit ", archived_range, " archived to ", archive->path, " (sha256 ",
                          archive->sha256_hex, "); the live log starts at ", through + 1);
  storage::WriteBatch batch;
  batch.requests.push_back(request);
  batch.settings[kAuditFloorSetting] = EncodeFloor(floor);
  batch.archival = storage::AuditArchival{floor, request.closed_at, request.id};
  call.event().row = storage::RequestRowName(request.id);
  audit::Event archived = ServerEvent(
      "ArchiveAuditLog", "", request.id, absl::StatusCode::kOk,
      StrCat(archived_range, " and ", archive->checkpoints, " checkpoints archived to ",
             archive->path, " sha256=", archive->sha256_hex, "; the live log starts after the ",
             "checkpoint at ", through, " (hash ", audit::ToHex(checkpoint.hash), ")"));
  archived.row = storage::SettingRowName(kAuditFloorSetting);
  CUSTOS_RETURN_IF_ERROR(
      call.CommitWith(std::move(batch), absl::StatusCode::kOk, {std::move(archived)}));
  // Signed at once: a verifier believes the live log's new start only once the ArchiveAuditLog
  // record is covered by a signature. (If this fails, the timer signs again.)
  if (absl::Status signed_head = Checkpoint(); !signed_head.ok()) {
    spdlog::error("audit checkpoint after archiving: {}", signed_head.ToString());
  }
  PublishArchives(through);
  // The archived records are removed by maintenance, in slices, while calls go on.
  if (options_.wake_maintenance) options_.wake_maintenance();
  return request;
}

void Kms::PublishArchives(uint64_t floor) const {
  if (options_.audit_archive_dir.empty()) return;
  absl::StatusOr<std::vector<std::string>> left =
      storage::PublishAuditArchives(options_.audit_archive_dir, floor);
  if (!left.ok()) {  // tried again at the next start
    spdlog::error("audit archive: {}", left.status().ToString());
    return;
  }
  for (const std::string& path : *left) {
    spdlog::warn(
        "audit archive: {} is from an archival that did not commit (the live log still holds "
        "its records past record {}): not an archive; remove it once no longer wanted",
        path, floor);
  }
}

absl::StatusOr<bool> Kms::RemoveArchivedRecords() {
  for (size_t slice = 0; slice < kRemovalSlicesPerTurn; ++slice) {
    CUSTOS_ASSIGN_OR_RETURN(const size_t removed,
                            options_.store->RemoveArchivedRecords(kRemovalSlice));
    if (removed < kRemovalSlice) return false;
  }
  return true;
}

absl::Status Kms::CheckAuditFloor() const {
  // The floor custosd sealed (checked as any setting: its MAC, and the newest record naming
  // it) is the authority; the table the triggers read, the first record and the checkpoint
  // signed at the floor must all agree with it. Re-anchoring cannot repair a disagreement
  // (it is not an older copy of the database), so it is DATA_LOSS, not FAILED_PRECONDITION.
  // (Removing records after the floor also removes the record vouching for the sealed floor,
  // when it was among them: the sealed floor then fails its own check.) Records up to the
  // floor still stored are an archival's removal not finished yet: not the live log's, and
  // maintenance removes them. (The setting's absence need not wait for a walk of the log: the
  // table must then say never archived.)
  CUSTOS_ASSIGN_OR_RETURN(
      const std::optional<std::string> sealed,
      options_.store->GetSetting(kAuditFloorSetting, storage::KeyStore::Absence::kHarmless));
  AuditFloor floor{0, Bytes(audit::kHashBytes, 0)};
  if (sealed) {
    CUSTOS_ASSIGN_OR_RETURN(floor, DecodeFloor(*sealed));
  }
  CUSTOS_ASSIGN_OR_RETURN(const AuditFloor table, options_.store->AuditLogFloor());
  if (table.seq != floor.seq || table.hash != floor.hash) {
    return absl::DataLossError(StrCat(
        "the database's audit_archived table says the log was archived up to record ", table.seq,
        ", but the archival custosd sealed says ", floor.seq, ": it was changed outside Custos"));
  }
  CUSTOS_ASSIGN_OR_RETURN(const uint64_t first, options_.store->FirstAuditSeq());
  if (first > floor.seq + 1) {
    return absl::DataLossError(
        StrCat("the audit log starts at record ", first, ", but it was archived up to record ",
               floor.seq, floor.seq == 0 ? " (never archived)" : " only", ": ",
               Records(floor.seq + 1, first - 1), " were removed outside Custos"));
  }
  if (first == 0 && floor.seq > 0) {
    return absl::DataLossError(StrCat("the audit log is empty, but only records up to ", floor.seq,
                                      " were archived: the rest were removed"));
  }
  if (floor.seq == 0) return absl::OkStatus();
  absl::StatusOr<audit::Checkpoint> start = StoredCheckpointAt(*options_.store, floor.seq);
  if (absl::IsNotFound(start.status())) {
    return absl::DataLossError(StrCat("the checkpoint at record ", floor.seq,
                                      ", where the archived log starts, was deleted"));
  }
  CUSTOS_RETURN_IF_ERROR(start.status());
  CUSTOS_ASSIGN_OR_RETURN(const std::string pem,
                          options_.hsm->PublicKeyPem(options_.audit_signing_key_label));
  CUSTOS_ASSIGN_OR_RETURN(const audit::PublicKeyVerifier key,
                          audit::PublicKeyVerifier::FromPem(pem));
  if (!key.Verify(*start) || start->hash != floor.hash) {
    return absl::DataLossError(StrCat("the checkpoint at record ", floor.seq,
                                      ", where the archived log starts, is not the one this "
                                      "HSM signed there"));
  }
  // The sealed floor was read before the log was anchored, so the record vouching for it was
  // believed as stored. custosd signs a checkpoint right after an archival: anchored there,
  // the row is read again, and that record is recomputed up to the signature. (With no
  // checkpoint after it yet, the record is past the HSM's head, which the next check
  // recomputes from.)
  CUSTOS_ASSIGN_OR_RETURN(
      const uint64_t vouching,
      options_.store->LastRecordNaming(storage::SettingRowName(kAuditFloorSetting)));
  CUSTOS_ASSIGN_OR_RETURN(const std::vector<audit::Checkpoint> covering,
                          options_.store->ReadCheckpoints(vouching, 1));
  if (covering.empty()) return absl::OkStatus();
  if (!key.Verify(covering[0])) {
    return absl::DataLossError(StrCat("the checkpoint at record ", covering[0].seq,
                                      ", after the archival's record, is not signed by this HSM"));
  }
  options_.store->AnchorAuditLog(covering[0].seq, covering[0].hash, /*rows_noted=*/false);
  return options_.store->GetSetting(kAuditFloorSetting, storage::KeyStore::Absence::kHarmless)
      .status();
}

}  // namespace custos::core
