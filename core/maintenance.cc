// Housekeeping the server does by itself (pre-approved by policy, audited as the server):
// expiry, crypto-shredding when a deletion is due, automatic rotation, and resuming a root
// rotation's background work (core/root_rotation.cc).
#include <algorithm>
#include <optional>

#include "absl/strings/cord.h"
#include "common/strings.h"
#include "core/call.h"
#include "core/kms.h"
#include "spdlog/spdlog.h"
#include "storage/row_codec.h"

namespace custos::core {
namespace {

using policy::Operation;
using storage::KeyRecord;
using storage::KeyState;
using storage::RequestState;

}  // namespace

absl::Status Kms::DestroyKey(const std::string& key_id) {
  CUSTOS_ASSIGN_OR_RETURN(KeyRef current, options_.store->GetKey(key_id));
  KeyRecord key = *current;
  for (storage::KeyVersion& version : key.versions) version.wrapped.clear();
  key.state = KeyState::kDestroyed;
  key.destroyed_at = options_.clock->NowSeconds();
  storage::WriteBatch batch;
  batch.keys.push_back(key);
  audit::Event destroyed = ServerEvent("DestroyKey", key.id, "", absl::StatusCode::kOk);
  destroyed.row = storage::KeyRowName(key.id);
  // The WAL still holds the erased bytes until it is purged: remembered in the same
  // transaction (and recorded, so that nobody can put back a "done"), so that a purge that
  // fails (a reader holding the file) or a crash is retried until it succeeds.
  batch.settings.emplace(kPurgePendingSetting, "1");
  audit::Event pending = ServerEvent("PurgePending", key.id, "", absl::StatusCode::kOk,
                                     "erased material stays in the WAL until it is purged");
  pending.row = storage::SettingRowName(kPurgePendingSetting);
  CUSTOS_RETURN_IF_ERROR(Commit(std::move(batch), {std::move(destroyed), std::move(pending)}));
  for (const storage::KeyVersion& version : key.versions) {
    options_.hsm->Forget(StrCat(key.id, "/", version.version));
  }
  return absl::OkStatus();  // the purge follows, once for every key destroyed this turn
}

absl::Status Kms::PurgeErased() {
  CUSTOS_ASSIGN_OR_RETURN(
      const std::optional<std::string> pending,
      options_.store->GetSetting(kPurgePendingSetting, storage::KeyStore::Absence::kHarmless));
  if (pending.value_or(std::string()) != std::string_view("1")) return absl::OkStatus();
  absl::Status purged = options_.store->PurgeErased();
  audit::Event event = ServerEvent("PurgeErasedMaterial", "", "", purged.code(),
                                   purged.ok() ? "" : std::string(purged.message()));
  storage::WriteBatch done;
  if (purged.ok()) {
    done.settings.emplace(kPurgePendingSetting, "0");
    event.row = storage::SettingRowName(kPurgePendingSetting);
  }
  CUSTOS_RETURN_IF_ERROR(Commit(std::move(done), {std::move(event)}));
  return purged;
}

absl::Status Kms::RunMaintenance() {
  // A slice of the log's older records recomputed (outside the request lock), so that no first
  // use of a row last changed long ago waits for it; a change found there is alarmed once.
  const absl::Status older = options_.store->VerifyOlderAuditRecords(kOlderRecordsPerTurn);
  if (absl::IsFailedPrecondition(older)) {
    absl::Status alarm = absl::DataLossError(
        StrCat("the audit log was changed after it was written: ", older.message()));
    alarm.SetPayload(storage::kIntegrityPayload, absl::Cord("audit_log"));
    RaiseIntegrityAlarm(alarm);
  }
  // Nothing acts on a catalogue whose log failed its check until officers re-anchor it.
  CUSTOS_RETURN_IF_ERROR(ServingAllowed(Operation::kRotateKey));
  // The root new versions go under is proven here, outside every lock, once the walk above has
  // reached the floor (sooner, by turns woken one after another while it goes on), or found
  // the log changed (the proof then fails at once if it needs the walk), rather than by the
  // first officer call to need it. Refused, it is alarmed, every new version is refused, and
  // the rest of the turn goes on. A walk that could not read the log is tried next turn.
  const bool walking = older.ok() && !options_.store->LiveLogWalked();
  if (walking && options_.wake_maintenance) options_.wake_maintenance();
  bool new_versions = RootProven();
  if (!new_versions && !walking && (older.ok() || absl::IsFailedPrecondition(older))) {
    const absl::Status root = RootForNewVersions().status();
    RaiseIntegrityAlarm(root);
    if (absl::IsDataLoss(root) && !root_refusal_logged_.exchange(true)) {
      spdlog::error("no new key version can be made: the root key in use is not proven: {}",
                    root.ToString());
    }
    new_versions = root.ok();
  }
  // Records an archival left to remove: a turn's share, and another turn soon if more are left.
  if (absl::StatusOr<bool> more = RemoveArchivedRecords(); !more.ok()) {
    spdlog::warn("removing archived audit records: {}", more.status().ToString());
  } else if (*more && options_.wake_maintenance) {
    options_.wake_maintenance();
  }
  std::lock_guard turn(maintenance_mu_);
  absl::Status done = RunMaintenanceTurn(new_versions);
  RaiseIntegrityAlarm(done);
  return done;
}

absl::Status Kms::RunMaintenanceTurn(bool new_versions) {
  const int64_t now = options_.clock->NowSeconds();
  CUSTOS_ASSIGN_OR_RETURN(const int64_t observed, observed_.Now());
  // Requests expire by the later reading, rotations fall due by the earlier (WallBounds).
  const ObservedTime::Bounds time = observed_.WallBounds();
  absl::Status roots;
  {
    // What concerns the whole server: the roots. (Destroying a retired root is the only HSM
    // call made holding the server, and only after a root rotation.)
    ChangeLock server = LockServer();
    if (const auto jump = observed_.WallClockJump(kClockJumpToleranceSeconds)) {
      const std::string detail = StrCat("the wall clock moved ", jump->seconds,
                                        " s against the time this server observed passing; ",
                                        "key destruction waits for both clocks; until "
                                        "custosd restarts, requests and tokens expire by the "
                                        "later of the two and rotations fall due by the "
                                        "earlier");
      spdlog::error("clock: {}", detail);
      CUSTOS_RETURN_IF_ERROR(
          Commit({}, {ServerEvent("ClockJump", "", "", absl::StatusCode::kOk, detail)}));
      observed_.Reported(*jump);  // only once recorded
    }
    // After a restart. Its failure (the setting unreadable) must not hold up the rest of the
    // turn, destructions above all: logged, and tried again next turn.
    if (absl::Status resumed = ResumeRootMigration(); !resumed.ok()) {
      spdlog::error("root rotation: cannot resume re-wrapping: {}", resumed.ToString());
    }
    // Nor does a retired root that cannot be destroyed now (the attempt recorded; a token
    // that refuses it may refuse for good): the turn reports it, and the next one retries.
    roots = DestroyRetiredRoots("");
  }
  // The rest, one key (or request) at a time, each checked again under its lock: an officer
  // may have changed it since it was listed.
  CUSTOS_ASSIGN_OR_RETURN(std::vector<Request> pending, options_.store->PendingRequests());
  // A row its integrity check refuses (alarmed once, when found) is skipped: one row edited
  // outside Custos must not hold up every other key's destruction, rotation and usage flush.
  for (const Request& listed : pending) {
    if (listed.expires_at > time.latest) continue;
    ChangeLock lock = LockShared(LockNameOf(listed));
    absl::StatusOr<Request> request = options_.store->GetRequest(listed.id);
    if (storage::RefusedRow(request.status())) {
      RaiseIntegrityAlarm(request.status());
      continue;
    }
    CUSTOS_RETURN_IF_ERROR(request.status());
    if (request->state == RequestState::kPending && request->expires_at <= time.latest) {
      CUSTOS_RETURN_IF_ERROR(Expire(*std::move(request)));
    }
  }
  CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> due,
                          options_.store->KeysDueForDeletion(now, observed));
  for (const std::string& key_id : due) {
    ChangeLock lock = LockShared(KeyLockName(key_id));
    absl::StatusOr<KeyRef> key = options_.store->GetKey(key_id);
    if (storage::RefusedRow(key.status())) {
      RaiseIntegrityAlarm(key.status());
      continue;
    }
    CUSTOS_RETURN_IF_ERROR(key.status());
    if ((*key)->state == KeyState::kPendingDeletion && (*key)->deletion_due_at <= now &&
        (*key)->deletion_due_observed <= observed) {
      CUSTOS_RETURN_IF_ERROR(DestroyKey(key_id));
    }
  }
  // A purge that cannot run now (a reader holding the file) is retried next turn; the rest of
  // the turn does not wait for it.
  absl::Status purged;
  {
    ChangeLock lock = LockShared("");
    purged = PurgeErased();
  }
  // Rotations due by period (whatever the primary version), then those a version's usage asked
  // for (only while that version is still primary: one crossing, one rotation). Both wait for
  // the root in use to be proven: a key still falls due next turn, and usage's stays wanted.
  if (new_versions) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<std::string> stale,
                            options_.store->KeysDueForRotation(time.earliest));
    for (const std::string& key_id : stale) {
      ChangeLock lock = LockShared(KeyLockName(key_id));
      absl::Status rotated = AutoRotate(key_id, std::nullopt, time.earliest);
      if (!rotated.ok() && !storage::RefusedRow(rotated)) return rotated;
      RaiseIntegrityAlarm(rotated);
    }
    for (const auto& [key_id, version] : usage_.RotationWanted()) {
      ChangeLock lock = LockShared(KeyLockName(key_id));
      absl::Status rotated = AutoRotate(key_id, version, now);
      if (storage::RefusedRow(rotated)) {
        RaiseIntegrityAlarm(rotated);
        continue;  // still wanted, should the row be restored
      }
      CUSTOS_RETURN_IF_ERROR(rotated);
      usage_.RotationDone(key_id, version);
    }
  }
  CUSTOS_RETURN_IF_ERROR(observed_.Persist());
  CUSTOS_RETURN_IF_ERROR(usage_.Flush());
  return roots.ok() ? purged : roots;
}

absl::Status Kms::AutoRotate(const std::string& key_id, std::optional<uint32_t> worn_version,
                             int64_t now) {
  CUSTOS_ASSIGN_OR_RETURN(KeyRef key, options_.store->GetKey(key_id));
  if (key->state != KeyState::kEnabled) return absl::OkStatus();  // nothing encrypts under it
  if (worn_version && key->primary_version != *worn_version) return absl::OkStatus();  // done
  if (!worn_version) {  // due by period: unless an officer rotated it since it was listed
    const auto primary = std::find_if(
        key->versions.begin(), key->versions.end(),
        [&](const storage::KeyVersion& v) { return v.version == key->primary_version; });
    if (key->rotation_period_seconds <= 0 || primary == key->versions.end() ||
        primary->created_at + key->rotation_period_seconds > now) {
      return absl::OkStatus();
    }
  }
  absl::StatusOr<KeyRecord> rotated = Applied(*key, Operation::kRotateKey, {});
  if (!rotated.ok()) {
    (void)Commit({}, {ServerEvent("AutoRotateKey", key_id, "", rotated.status().code())});
    return rotated.status();
  }
  storage::WriteBatch batch;
  batch.keys.push_back(*rotated);
  audit::Event event = ServerEvent("AutoRotateKey", key_id, "", absl::StatusCode::kOk);
  event.key_version = rotated->primary_version;
  event.row = storage::KeyRowName(key_id);
  return Commit(std::move(batch), {event});
}

}  // namespace custos::core
