#include "storage/key_store.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <sqlite3.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <iterator>
#include <limits>
#include <mutex>
#include <optional>
#include <set>
#include <string_view>
#include <utility>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/failure_log.h"
#include "common/strings.h"
#include "spdlog/spdlog.h"
#include "storage/audit_rows.h"
#include "storage/key_cache.h"
#include "storage/key_rows.h"
#include "storage/request_rows.h"
#include "storage/row_codec.h"
#include "storage/row_integrity.h"
#include "storage/schema.h"
#include "storage/sqlite.h"
#include "storage/state_lock.h"

namespace custos::storage {
namespace {

constexpr size_t kMaxPageSize = 1000;
// How long a statement waits for another connection's lock before giving up with BUSY.
constexpr int kBusyTimeoutMs = 5000;
// Records recomputed at a time when the whole live log must be known intact (VerifyLiveLog).
constexpr uint64_t kLiveLogCoverSlice = 100'000;
// The WAL's size past which a warning says a reader keeps it growing (KeyStore::WarnWalAbove),
// and the most it is left at once it starts over.
constexpr uint64_t kDefaultWalWarnBytes = uint64_t{256} << 20;
constexpr uint64_t kMaxWalKeptBytes = uint64_t{64} << 20;
constexpr char kHex[] = "0123456789abcdef";

absl::Status LimitKeptWal(sqlite::Database& db, uint64_t warn_bytes) {
  const uint64_t kept = std::min(kMaxWalKeptBytes, warn_bytes / 2);
  return db.Exec(absl::StrCat("PRAGMA journal_size_limit = ", kept).c_str());
}

// The tail mark's key derivation (Impl::TailKey) and its nonce's size.
constexpr std::string_view kTailKeyMagic = "custos-audit-tail-v1";
constexpr size_t kTailNonceBytes = 16;

// The tail mark's MAC: HMAC-SHA256 under `key` of the chain's newest hash.
Bytes TailMac(const SecureBytes& key, const audit::Chain& chain) {
  Bytes mac(EVP_MAX_MD_SIZE);
  unsigned int size = 0;
  HMAC(EVP_sha256(), key.span().data(), static_cast<int>(key.size()), chain.last_hash().data(),
       chain.last_hash().size(), mac.data(), &size);
  mac.resize(size);
  return mac;
}

// How long PurgeErased waits for another connection's readers to let go.
constexpr std::chrono::milliseconds kPurgeBusyTimeout(100);

// While alive, the connection waits for another connection's lock only for what is left of
// `total` since its caller began to wait (for db_mu_ or the group commit's queue included).
// The timeout is each caller's, not each transaction's: writers queued behind one that waited
// out a DBA's lock would otherwise each wait the whole timeout anew, in turn.
class BusyBudget {
 public:
  BusyBudget(sqlite::Database& db, std::chrono::steady_clock::time_point since,
             std::chrono::milliseconds total = std::chrono::milliseconds(kBusyTimeoutMs))
      : db_(db) {
    const auto waited = std::chrono::duration_cast<std::chrono::milliseconds>(
        std::chrono::steady_clock::now() - since);
    sqlite3_busy_timeout(db_.handle(), static_cast<int>(std::clamp<int64_t>(
                                           (total - waited).count(), 0, total.count())));
  }
  ~BusyBudget() { sqlite3_busy_timeout(db_.handle(), kBusyTimeoutMs); }
  BusyBudget(const BusyBudget&) = delete;
  BusyBudget& operator=(const BusyBudget&) = delete;

 private:
  sqlite::Database& db_;
};

absl::Status Configure(sqlite::Database& db) {
  sqlite3_busy_timeout(db.handle(), kBusyTimeoutMs);
  // secure_delete: freed pages are zeroed, so erased key material cannot be read back from
  // the file. foreign_keys: child rows cannot outlive their key.
  CUSTOS_RETURN_IF_ERROR(db.Exec("PRAGMA secure_delete = ON"));
  CUSTOS_RETURN_IF_ERROR(db.Exec("PRAGMA foreign_keys = ON"));
  // Statement journals and sorts stay in memory: no temporary file ever holds key material.
  CUSTOS_RETURN_IF_ERROR(db.Exec("PRAGMA temp_store = MEMORY"));
  CUSTOS_RETURN_IF_ERROR(db.Exec("PRAGMA synchronous = FULL"));
  CUSTOS_ASSIGN_OR_RETURN(const std::string mode, db.QueryText("PRAGMA journal_mode = WAL"));
  if (mode != "wal") {
    return absl::FailedPreconditionError(
        absl::StrCat("the key database cannot use WAL journaling (journal_mode is '", mode, "')"));
  }
  return LimitKeptWal(db, kDefaultWalWarnBytes);
}

// The size of the file at `path`; 0 if there is none.
absl::StatusOr<uint64_t> FileSize(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return 0;
    return absl::UnavailableError(absl::StrCat("cannot stat '", path, "': ", std::strerror(errno)));
  }
  return static_cast<uint64_t>(st.st_size);
}

// Page tokens are the hex of the last id returned: opaque to callers, trivially checked.
std::string EncodePageToken(std::string_view last_id) {
  std::string token;
  token.reserve(last_id.size() * 2);
  for (unsigned char c : last_id) {
    token.push_back(kHex[c >> 4]);
    token.push_back(kHex[c & 0x0f]);
  }
  return token;
}

int HexDigit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// The text a token encodes, or INVALID_ARGUMENT naming the method whose reply it should have
// come from.
absl::StatusOr<std::string> DecodePageToken(std::string_view token, std::string_view method) {
  std::string text;
  text.reserve(token.size() / 2);
  for (size_t i = 0; i + 1 < token.size(); i += 2) {
    const int hi = HexDigit(token[i]);
    const int lo = HexDigit(token[i + 1]);
    if (hi < 0 || lo < 0) break;
    text.push_back(static_cast<char>(hi << 4 | lo));
  }
  if (token.size() % 2 != 0 || text.size() * 2 != token.size()) {
    return absl::InvalidArgumentError(StrCat(
        "invalid page token: pass back the next_page_token of a previous ", method, " reply"));
  }
  return text;
}

absl::Status CheckPageSize(size_t page_size) {
  if (page_size >= 1 && page_size <= kMaxPageSize) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat("page_size must be between 1 and ", kMaxPageSize, ", got ", page_size));
}

// A request listing's token encodes its cursor as "<created_at>:<id>".
std::string EncodeRequestToken(const RequestRecord& last) {
  return EncodePageToken(absl::StrCat(last.created_at, ":", last.id));
}

absl::StatusOr<std::optional<RequestCursor>> DecodeRequestToken(std::string_view token) {
  if (token.empty()) return std::nullopt;
  constexpr std::string_view kMethod = "ListRequests";
  CUSTOS_ASSIGN_OR_RETURN(const std::string text, DecodePageToken(token, kMethod));
  const size_t colon = text.find(':');
  RequestCursor cursor;
  if (colon == std::string::npos || colon + 1 == text.size() ||
      !absl::SimpleAtoi(text.substr(0, colon), &cursor.created_at)) {
    return absl::InvalidArgumentError(StrCat(
        "invalid page token: pass back the next_page_token of a previous ", kMethod, " reply"));
  }
  cursor.id = text.substr(colon + 1);
  return cursor;
}

// What the database would refuse with a constraint message, refused up front in words.
absl::Status ValidateKey(const KeyRecord& key) {
  if (key.id.empty()) return absl::InvalidArgumentError("a key needs a non-empty id");
  std::set<uint32_t> versions;
  for (const KeyVersion& version : key.versions) {
    if (version.version == 0 || !versions.insert(version.version).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("key '", key.id, "' has version number ", version.version,
                       version.version == 0 ? " (versions start at 1)" : " more than once"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateRequest(const RequestRecord& request) {
  if (request.id.empty()) return absl::InvalidArgumentError("a request needs a non-empty id");
  std::set<std::string_view> approvers;
  for (const Approval& approval : request.approvals) {
    if (!approvers.insert(approval.principal).second) {
      return absl::InvalidArgumentError(absl::StrCat("request '", request.id, "' lists approver '",
                                                     approval.principal, "' more than once"));
    }
  }
  return absl::OkStatus();
}

// The record as it will be cached: versions ascending, as they are read back from SQLite.
std::shared_ptr<KeyRecord> Normalized(const KeyRecord& key) {
  auto record = std::make_shared<KeyRecord>(key);
  std::stable_sort(record->versions.begin(), record->versions.end(),
                   [](const KeyVersion& a, const KeyVersion& b) { return a.version < b.version; });
  return record;
}

absl::Status WriteSetting(sqlite::Database& db, const std::string& name, const std::string& value,
                          const Bytes& mac) {
  CUSTOS_ASSIGN_OR_RETURN(
      sqlite::Statement upsert,
      db.Prepare("INSERT INTO settings (name, value, mac) VALUES (?1, ?2, ?3) "
                 "ON CONFLICT (name) DO UPDATE SET value = excluded.value, mac = excluded.mac"));
  upsert.BindText(1, name).BindText(2, value);
  if (mac.empty()) {
    upsert.BindNull(3);
  } else {
    upsert.BindBlob(3, mac);
  }
  return upsert.Run();
}

struct StoredSetting {
  std::string value;
  Bytes mac;
};

absl::StatusOr<std::optional<StoredSetting>> ReadSetting(sqlite::Database& db,
                                                         std::string_view name) {
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement select,
                          db.Prepare("SELECT value, mac FROM settings WHERE name = ?1"));
  select.BindText(1, name);
  CUSTOS_ASSIGN_OR_RETURN(const bool row, select.Step());
  if (!row) return std::optional<StoredSetting>();
  return std::optional<StoredSetting>(StoredSetting{select.ColumnText(0), select.ColumnBlob(1)});
}

// `versions` with those `batch` reserves for `key` added, ascending, and only versions `key`
// has (a stamp naming a version not created yet would refuse it once it is).
std::vector<uint32_t> WithReserved(std::vector<uint32_t> versions, const KeyRecord& key,
                                   const WriteBatch& batch) {
  for (const VersionUsage& usage : batch.usage) {
    if (usage.key_id == key.id && usage.encryptions_reserved > 0) versions.push_back(usage.version);
  }
  std::sort(versions.begin(), versions.end());
  versions.erase(std::unique(versions.begin(), versions.end()), versions.end());
  std::erase_if(versions, [&](uint32_t version) {
    return std::none_of(key.versions.begin(), key.versions.end(),
                        [&](const KeyVersion& v) { return v.version == version; });
  });
  return versions;
}

// What KeyRecord::reserved_versions of `key` is once `batch` is written: the versions reserved
// in the database, and those `batch` reserves (of the versions `key` has).
absl::StatusOr<std::vector<uint32_t>> ReservedVersions(sqlite::Database& db, const KeyRecord& key,
                                                       const WriteBatch& batch) {
  CUSTOS_ASSIGN_OR_RETURN(std::vector<uint32_t> versions, SelectReservedVersions(db, key.id));
  return WithReserved(std::move(versions), key, batch);
}

// Set, with its record, once the catalogue is sealed (see SealCatalog).
constexpr char kCatalogSealedSetting[] = "catalog_sealed";

absl::Status NoKeyWithId(std::string_view id) {
  return absl::NotFoundError(StrCat("no key with id '", id, "'"));
}

}  // namespace

// Lock order: db_mu before the cache's own lock. Loads from SQLite and writes both run under
// db_mu and update the cache before releasing it, so a slow load can never put back a record
// older than one a write has just cached. Cache hits take only the cache's lock.
class KeyStore::Impl {
 public:
  Impl(std::unique_ptr<StateLock> lock, std::unique_ptr<sqlite::Database> db, int schema_version,
       RowAuthenticator* authenticator)
      : lock_(std::move(lock)),
        db_(std::move(db)),
        schema_version_(schema_version),
        trust_([this](uint64_t from_seq, size_t limit) { return ReadVerifiable(from_seq, limit); }),
        integrity_(authenticator, &trust_),
        authenticator_(authenticator) {}

  // The key that marks the log's newest record (CheckAuditTail), made from `nonce`: the
  // authenticator's MAC (in the HSM) of kTailKeyMagic and the nonce. A row's canonical
  // encoding begins "custos-row-v1", so no row's MAC is ever such a key, nor the reverse.
  absl::StatusOr<SecureBytes> TailKey(std::span<const uint8_t> nonce) {
    Bytes input(kTailKeyMagic.begin(), kTailKeyMagic.end());
    input.insert(input.end(), nonce.begin(), nonce.end());
    CUSTOS_ASSIGN_OR_RETURN(Bytes mac, authenticator_->Mac(input));
    SecureBytes key(mac);
    OPENSSL_cleanse(mac.data(), mac.size());
    return key;
  }

  // Makes this run's tail mark key under a fresh nonce (one HSM call). Under db_mu_.
  absl::Status MakeTailKey() {
    Bytes nonce(kTailNonceBytes);
    if (RAND_bytes(nonce.data(), static_cast<int>(nonce.size())) != 1) {
      return absl::InternalError("no random bytes for the audit log's tail mark");
    }
    CUSTOS_ASSIGN_OR_RETURN(tail_key_, TailKey(nonce));
    tail_nonce_ = std::move(nonce);
    return absl::OkStatus();
  }

  // Under db_mu_, in a write transaction about to commit: marks the log's newest record if
  // the transaction wrote records (the chain moved past `seq_before`). The key is made at
  // the first such write of the run (one HSM call), under a nonce of its own.
  absl::Status MarkTail(uint64_t seq_before) {
    if (authenticator_ == nullptr || !tail_marking_ || chain_.last_seq() == seq_before) {
      return absl::OkStatus();
    }
    if (tail_key_.empty()) CUSTOS_RETURN_IF_ERROR(MakeTailKey());
    return WriteTailMark(*db_, {chain_.last_seq(), tail_nonce_, TailMac(tail_key_, chain_)});
  }

  // Records with seq >= `from_seq`, at most `limit`, read to have their chain verified: their
  // row index entries are checked with them (CheckRowIndexed), so that the index holds every
  // record whose chain is known intact.
  absl::StatusOr<std::vector<audit::Record>> ReadVerifiable(uint64_t from_seq, size_t limit) {
    std::lock_guard lock(db_mu_);
    CUSTOS_ASSIGN_OR_RETURN(std::vector<audit::Record> records,
                            LoadAuditRecords(*db_, from_seq, limit));
    CUSTOS_RETURN_IF_ERROR(CheckIndexed(records));
    return records;
  }
  // Under db_mu_: notes the rows the records name (RowIntegrity::Noted), then checks their row
  // index entries. Noted first: a row whose record's entry is missing, and which is then found
  // absent, is refused; a walk that fails believes none of its records all the same.
  absl::Status CheckIndexed(const std::vector<audit::Record>& records) {
    for (const audit::Record& record : records) {
      if (!record.row.empty()) {
        integrity_.Noted(record.row, RowRecord{record.seq, record.row_digest});
      }
    }
    return CheckRowIndexed(*db_, records);
  }

  // Declared first, so released last: after the database is closed.
  const std::unique_ptr<StateLock> lock_;
  std::mutex db_mu_;
  const std::unique_ptr<sqlite::Database> db_;  // Guarded by db_mu_.
  const int schema_version_;
  KeyCache cache_;
  AuditTrust trust_;
  RowIntegrity integrity_;
  RowAuthenticator* const authenticator_;  // null: no rows checked, no tail marked
  // The tail mark's key and nonce for this run, made at its first write of records.
  SecureBytes tail_key_;  // guarded by db_mu_
  Bytes tail_nonce_;      // guarded by db_mu_
  // Off while the log awaits re-anchoring (SetTailMarking): the run's records do not vouch
  // for what it found after the head.
  bool tail_marking_ = true;  // guarded by db_mu_
  // Bumped (under db_mu_) by every committed write of a key: a load checked outside the lock
  // is cached only if no write came in between (else it may be older than what was written).
  uint64_t key_writes_ = 0;

  // Group commit (as LevelDB's DBImpl::Write): Apply callers queue here; the one at the front
  // commits every queued batch in one transaction (one fsync) and wakes the others.
  struct Writer {
    const WriteBatch* batch = nullptr;
    // The batch as written: sealed (MACs set), and its audit records with the digests of the
    // rows they name.
    std::vector<std::shared_ptr<KeyRecord>> records;  // the batch's keys, as cached
    std::vector<RequestRecord> requests;
    std::vector<VersionUsage> usage;
    std::map<std::string, Bytes> setting_macs;  // by setting name
    std::vector<audit::Record> audit;
    absl::Status status;
    bool restamp = false;  // see ApplyOnce
    bool done = false;
    std::condition_variable cv;
    const std::chrono::steady_clock::time_point queued = std::chrono::steady_clock::now();
  };
  std::mutex queue_mu_;
  std::deque<Writer*> writers_;  // Guarded by queue_mu_.

  absl::Status write_fault_;  // guarded by db_mu_
  // The database refusing writes (a full disk, I/O errors) shows in the operator's log.
  FailureLog write_failures_{"key database writes"};
  absl::Status NoteWrite(absl::Status status) {
    if (status.ok() || absl::IsAlreadyExists(status) || absl::IsInvalidArgument(status)) {
      write_failures_.Succeeded();
    } else {
      write_failures_.Failed(status);
    }
    return status;
  }
  // The audit chain's head, guarded by db_mu_: advanced as records are written, put back if
  // their savepoint or transaction is rolled back.
  audit::Chain chain_;
  AuditFloor floor_;                                // guarded by db_mu_
  CommitStats commit_stats_;                        // guarded by db_mu_
  KeyStore::CommitObserver commit_observer_;        // set before concurrent use
  uint64_t wal_warn_bytes_ = kDefaultWalWarnBytes;  // guarded by db_mu_
  bool wal_warned_ = false;                         // guarded by db_mu_

  // Called under db_mu_ after each health probe's commit (KeyStore::WarnWalAbove).
  void WatchWalSize() {
    const absl::StatusOr<uint64_t> size = FileSize(db_->path() + "-wal");
    if (!size.ok()) return;  // the probe's own commit says what is wrong with the files
    if (*size > wal_warn_bytes_ && !wal_warned_) {
      wal_warned_ = true;
      spdlog::warn(
          "the key database's WAL has grown to {} MiB (warning above {} MiB): most likely "
          "another connection holds a read transaction open on the database, so checkpoints "
          "cannot reach its end and it grows with every commit until that reader ends its "
          "transaction (one very large write, such as an archival, can also pass the size once)",
          *size >> 20, wal_warn_bytes_ >> 20);
    } else if (*size <= wal_warn_bytes_ && wal_warned_) {
      wal_warned_ = false;
      spdlog::info("the key database's WAL is back under {} MiB ({} KiB)", wal_warn_bytes_ >> 20,
                   *size >> 10);
    }
  }

  // Checks `batch`, and fills `writer` with it as it will be written: rows sealed, and each
  // audit record that names a row given that row's digest. Outside any lock (it may call the
  // HSM). INVALID_ARGUMENT for a malformed batch or a record naming a row not in it.
  // Each key row is stamped with its reserved versions (KeyRecord::reserved_versions): those
  // the row given names and those the batch reserves, and with `read_reserved` or several
  // keys those the database holds too (ReservedVersions, under db_mu_). A single key without
  // (a new key, an officer's change) is most often right all the same, and waits for no
  // commit, which holds db_mu_ through its fsync.
  absl::Status Prepare(const WriteBatch& batch, Writer& writer, bool read_reserved);

  // Apply's work, once: ABORTED, with `restamp` set, if a key row's stamp misses a version
  // the database holds reserved when it is written (reserved since the row given was read).
  absl::Status ApplyOnce(const WriteBatch& batch, bool read_reserved, bool& restamp);

  // Appends a record carrying forward each row (up to `limit`) whose newest naming record is
  // at or before `through` (KeyStore::CarryForwardRowRecords), inside the open transaction.
  absl::StatusOr<size_t> CarryForward(uint64_t through, const CarryRecord& carry, size_t limit,
                                      std::string& after) {
    size_t carried = 0;
    while (carried < limit) {
      CUSTOS_ASSIGN_OR_RETURN(
          auto rows, RowsLastRecordedBy(*db_, through, after,
                                        std::min<size_t>(limit - carried, 1000), floor_.seq));
      if (rows.empty()) break;
      std::set<std::string> with_keys;  // reservations this page carried with their key's row
      for (const auto& [name, recorded] : rows) {
        if (with_keys.count(name)) continue;  // (read before its key's row was carried)
        CUSTOS_RETURN_IF_ERROR(CarryOne(name, recorded, carry));
        ++carried;
        if (name.rfind("key:", 0) == 0) {
          const size_t before = with_keys.size();
          CUSTOS_RETURN_IF_ERROR(CarryReservations(name.substr(4), carry, with_keys));
          carried += with_keys.size() - before;
        }
      }
      after = rows.back().first;
    }
    return carried;
  }

  // Appends a record carrying row `name` forward, vouching for the content `recorded` does.
  absl::Status CarryOne(const std::string& name, const RowRecord& recorded,
                        const CarryRecord& carry) {
    CUSTOS_RETURN_IF_ERROR(integrity_.Agrees(name, recorded));  // edited while running?
    audit::Record record = carry(name, recorded.seq);
    record.row = name;
    record.row_digest = recorded.digest;
    chain_.Seal(record);
    CUSTOS_RETURN_IF_ERROR(InsertAuditRecord(*db_, record));
    written_heads_.emplace_back(name, RowRecord{record.seq, record.row_digest});
    return absl::OkStatus();
  }

  // A key's row carried forward names the reservations of when it was last written, and its
  // carry record comes after theirs: every reservation of the key is carried again right
  // after it, in the same transaction, so that each is still recorded after the key's newest
  // record (see KeyRecord::reserved_versions), however the archival ends. One so carried is
  // newer than `through` from then on, and not carried again; its name is added to `carried`.
  absl::Status CarryReservations(const std::string& key_id, const CarryRecord& carry,
                                 std::set<std::string>& carried) {
    CUSTOS_ASSIGN_OR_RETURN(const std::vector<uint32_t> versions,
                            SelectReservedVersions(*db_, key_id));
    for (uint32_t version : versions) {
      const std::string name = UsageRowName(key_id, version);
      CUSTOS_ASSIGN_OR_RETURN(const std::optional<RowRecord> recorded,
                              LatestRowRecord(*db_, name, floor_.seq));
      if (!recorded.has_value()) continue;
      CUSTOS_RETURN_IF_ERROR(CarryOne(name, *recorded, carry));
      carried.insert(name);
    }
    return absl::OkStatus();
  }

  // The rows the open transaction's records name, with those records: noted (RowIntegrity::
  // Noted) once it commits, dropped if it does not. Guarded by db_mu_.
  std::vector<std::pair<std::string, RowRecord>> written_heads_;
  void NoteWrittenHeads(bool committed) {
    if (committed) {
      for (const auto& [row, record] : written_heads_) integrity_.Noted(row, record);
    }
    written_heads_.clear();
  }

  // Writes one batch inside the open transaction, under a savepoint, so a batch that fails
  // (a taken alias, say) is undone alone and the rest of its group still commits.
  absl::Status WriteInGroup(Writer& writer);

  // The key with `id` from the cache, else loaded from the file and checked (outside db_mu_),
  // then cached; nullptr if there is none.
  absl::StatusOr<std::shared_ptr<const KeyRecord>> LoadChecked(std::string_view id);

  // `request`, as loaded under db_mu_ with the digest recorded for it, checked.
  // A setting, checked as `chain` says; nullopt if never set, believed as `absence` says
  // (`walked`: this call walked the live log already).
  absl::StatusOr<std::optional<std::string>> ReadCheckedSetting(
      std::string_view name, RowIntegrity::Chain chain,
      KeyStore::Absence absence = KeyStore::Absence::kProven, bool walked = false);

  absl::StatusOr<std::vector<std::optional<RowRecord>>> RecordedRequests(
      const std::vector<RequestRecord>& requests);
  absl::Status CheckRequest(const RequestRecord& request,
                            const std::optional<RowRecord>& recorded) {
    return integrity_.Check(RequestRowName(request.id), CanonicalRequestRow(request), request.mac,
                            recorded, RowIntegrity::Chain::kRecorded);
  }

  // Recomputes every record of the live log not known intact yet, with its row index entries,
  // a slice at a time (a row check waiting to cover a record of its own waits for one slice).
  // Outside db_mu_. FAILED_PRECONDITION if they do not verify.
  absl::Status VerifyLiveLog() {
    uint64_t floor = 0;
    {
      std::lock_guard lock(db_mu_);
      floor = floor_.seq;
    }
    for (uint64_t top = trust_.trusted_seq(); top > floor;) {
      CUSTOS_RETURN_IF_ERROR(trust_.Extend(kLiveLogCoverSlice));
      const uint64_t lower = trust_.trusted_seq();
      if (lower == top) break;  // the floor moved up to it meanwhile (an archival)
      top = lower;
    }
    return absl::OkStatus();
  }

  // The newest recorded digest of catalogue row `name` (under db_mu_).
  absl::StatusOr<std::optional<RowRecord>> Recorded(const std::string& name) {
    absl::StatusOr<std::optional<RowRecord>> recorded = LatestRowRecord(*db_, name, floor_.seq);
    if (!integrity_.enabled()) return recorded;
    // An index that does not hold up refuses the row it was asked about (and raises its alarm).
    if (absl::IsDataLoss(recorded.status())) {
      return integrity_.Refuse(name, std::string(recorded.status().message()));
    }
    if (recorded.ok()) CUSTOS_RETURN_IF_ERROR(integrity_.Agrees(name, *recorded));
    return recorded;
  }

  // Recorded, for a listing: a row refused is listed as such (its check finds the refusal
  // remembered), not in place of the whole page.
  absl::StatusOr<std::optional<RowRecord>> Listed(const std::string& name) {
    absl::StatusOr<std::optional<RowRecord>> recorded = Recorded(name);
    if (recorded.status().GetPayload(kIntegrityPayload)) return std::optional<RowRecord>();
    return recorded;
  }

  // For a row not in the database: DATA_LOSS (remembered) if the audit log records it, since
  // Custos never deletes key, request or usage rows, or if custosd wrote or verified a record
  // naming it in this run (Recorded); OK otherwise. Called with db_mu_ held.
  absl::Status Missing(const std::string& name) {
    if (!integrity_.enabled()) return absl::OkStatus();
    CUSTOS_ASSIGN_OR_RETURN(const std::optional<RowRecord> recorded, Recorded(name));
    if (!recorded.has_value()) return absl::OkStatus();
    return integrity_.Refuse(name, StrCat("it is missing from the database although audit record ",
                                          recorded->seq, " wrote it (deleted outside Custos?)"));
  }
};

absl::Status KeyStore::Impl::Prepare(const WriteBatch& batch, Writer& writer, bool read_reserved) {
  std::map<std::string, std::string> digests;  // of the rows written, by name
  writer.records.reserve(batch.keys.size());
  for (const KeyRecord& key : batch.keys) {
    CUSTOS_RETURN_IF_ERROR(ValidateKey(key));
    auto record = Normalized(key);
    // Never fewer than the row given names: a reservation deleted outside Custos stays missed.
    record->reserved_versions = WithReserved(key.reserved_versions, *record, batch);
    writer.records.push_back(std::move(record));
  }
  // A page of keys (a root migration, sealing) is read once for all; one key, only when it
  // was found out of date.
  if (read_reserved || batch.keys.size() > 1) {
    std::lock_guard lock(db_mu_);
    for (auto& record : writer.records) {
      CUSTOS_ASSIGN_OR_RETURN(const std::vector<uint32_t> stored,
                              ReservedVersions(*db_, *record, batch));
      std::vector<uint32_t> both;
      std::set_union(stored.begin(), stored.end(), record->reserved_versions.begin(),
                     record->reserved_versions.end(), std::back_inserter(both));
      record->reserved_versions = std::move(both);
    }
  }
  for (auto& record : writer.records) {
    const Bytes canonical = CanonicalKeyRow(*record);
    CUSTOS_ASSIGN_OR_RETURN(record->mac, integrity_.Seal(canonical));
    digests[KeyRowName(record->id)] = RowDigest(canonical);
  }
  for (const RequestRecord& request : batch.requests) {
    CUSTOS_RETURN_IF_ERROR(ValidateRequest(request));
    RequestRecord& sealed = writer.requests.emplace_back(request);
    const Bytes canonical = CanonicalRequestRow(sealed);
    CUSTOS_ASSIGN_OR_RETURN(sealed.mac, integrity_.Seal(canonical));
    digests[RequestRowName(sealed.id)] = RowDigest(canonical);
  }
  for (const VersionUsage& usage : batch.usage) {
    if (usage.key_id.empty() || usage.version == 0) {
      return absl::InvalidArgumentError(StrCat("usage of key '", usage.key_id, "' version ",
                                               usage.version, ": needs a key id and a version"));
    }
    VersionUsage& sealed = writer.usage.emplace_back(usage);
    const Bytes canonical = CanonicalUsageRow(sealed);
    CUSTOS_ASSIGN_OR_RETURN(sealed.mac, integrity_.Seal(canonical));
    digests[UsageRowName(sealed.key_id, sealed.version)] = RowDigest(canonical);
  }
  for (const auto& [name, value] : batch.settings) {
    if (name.empty()) return absl::InvalidArgumentError("a setting needs a name");
    const Bytes canonical = CanonicalSettingRow(name, value);
    CUSTOS_ASSIGN_OR_RETURN(writer.setting_macs[name], integrity_.Seal(canonical));
    digests[SettingRowName(name)] = RowDigest(canonical);
  }
  writer.audit = batch.audit;
  for (audit::Record& record : writer.audit) {
    if (record.row.empty()) continue;
    auto digest = digests.find(record.row);
    if (digest == digests.end()) {
      return absl::InvalidArgumentError(StrCat("audit record of ", record.action, " names row ",
                                               record.row, ", which its batch does not write"));
    }
    record.row_digest = digest->second;
  }
  return absl::OkStatus();
}

absl::Status KeyStore::Impl::WriteInGroup(Writer& writer) {
  audit::Chain chain_before = chain_;
  const size_t heads_before = written_heads_.size();
  CUSTOS_RETURN_IF_ERROR(db_->Exec("SAVEPOINT batch"));
  absl::Status status = [&]() -> absl::Status {
    // Written in order, each alias checked against what is stored at that point: two keys of
    // the batch claiming one alias conflict like any other pair. (Swapping two keys' aliases
    // therefore takes two batches, which no operation needs.)
    for (const auto& record : writer.records) {
      {
        CUSTOS_ASSIGN_OR_RETURN(const std::vector<uint32_t> reserved,
                                ReservedVersions(*db_, *record, *writer.batch));
        if (!std::includes(record->reserved_versions.begin(), record->reserved_versions.end(),
                           reserved.begin(), reserved.end())) {
          writer.restamp = true;
          return absl::AbortedError(StrCat("key '", record->id,
                                           "' had a version reserved while its change was "
                                           "prepared; try again"));
        }
      }
      CUSTOS_RETURN_IF_ERROR(WriteKey(*db_, *record));
    }
    for (const RequestRecord& request : writer.requests) {
      CUSTOS_RETURN_IF_ERROR(WriteRequest(*db_, request));
    }
    for (const auto& [name, value] : writer.batch->settings) {
      CUSTOS_RETURN_IF_ERROR(WriteSetting(*db_, name, value, writer.setting_macs.at(name)));
    }
    for (const VersionUsage& usage : writer.usage) CUSTOS_RETURN_IF_ERROR(UpsertUsage(*db_, usage));
    if (const auto& archival = writer.batch->archival) {
      if (archival->floor.seq <= floor_.seq || archival->floor.seq > chain_.last_seq()) {
        return absl::FailedPreconditionError(StrCat("cannot archive up to record ",
                                                    archival->floor.seq, ": the log runs from ",
                                                    floor_.seq + 1, " to ", chain_.last_seq()));
      }
      // Every row was carried beforehand, over a log known intact (CarryForwardRowRecords);
      // nothing new can need it since (new records come after the floor). This commit does
      // not walk the row index again (it would hold every other commit for as long): a row
      // named only by a record written outside Custos meanwhile is not carried, and is then
      // refused ("no audit record names it"), which fails closed.
      CUSTOS_RETURN_IF_ERROR(
          RecordArchival(*db_, archival->floor, archival->time, archival->request_id));
    }
    for (audit::Record record : writer.audit) {
      chain_.Seal(record);
      CUSTOS_RETURN_IF_ERROR(InsertAuditRecord(*db_, record));
      if (!record.row.empty())
        written_heads_.emplace_back(record.row, RowRecord{record.seq, record.row_digest});
    }
    return absl::OkStatus();
  }();
  if (!status.ok()) {
    written_heads_.resize(heads_before);
    chain_ = std::move(chain_before);
    // A full disk (and some I/O errors) make SQLite roll the whole transaction back by itself:
    // no savepoint is left to undo, and Apply fails the group whole.
    if (sqlite3_get_autocommit(db_->handle()) != 0) return status;
    if (absl::Status undone = db_->Exec("ROLLBACK TO batch"); !undone.ok()) {
      // The batch could not be undone alone: nothing of its group may commit (its records
      // would stay, under seqs the chain hands out again).
      db_->Exec("ROLLBACK").IgnoreError();
      return undone;
    }
  }
  CUSTOS_RETURN_IF_ERROR(db_->Exec("RELEASE batch"));
  return status;
}

KeyStore::KeyStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
KeyStore::~KeyStore() = default;

absl::StatusOr<std::unique_ptr<KeyStore>> KeyStore::Open(const std::string& path,
                                                         RowAuthenticator* authenticator) {
  // Before anything is read: the chain head below is then one no other writer can move.
  CUSTOS_ASSIGN_OR_RETURN(auto lock, StateLock::Acquire(path + ".lock"));
  // SQLite makes these with the database's mode; files left by an older run may be looser.
  // Fixed before the connection opens them: once it has, opening and closing them here would
  // drop SQLite's POSIX locks on them (close() drops every lock the process holds on a file),
  // and a reader would then take the live -shm for abandoned and reinitialise it.
  CUSTOS_RETURN_IF_ERROR(sqlite::RestrictToOwner(path + "-wal", /*create=*/false));
  CUSTOS_RETURN_IF_ERROR(sqlite::RestrictToOwner(path + "-shm", /*create=*/false));
  CUSTOS_ASSIGN_OR_RETURN(auto db, sqlite::Database::Open(path));
  CUSTOS_RETURN_IF_ERROR(Configure(*db));
  CUSTOS_ASSIGN_OR_RETURN(const int version, MigrateSchema(*db));
  CUSTOS_RETURN_IF_ERROR(CheckRowIndexDefinition(*db));
  CUSTOS_ASSIGN_OR_RETURN(std::optional<audit::Record> last, LoadLastAuditRecord(*db));
  auto impl = std::make_unique<Impl>(std::move(lock), std::move(db), version, authenticator);
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<AuditFloor> floor, LoadAuditFloor(*impl->db_));
  if (floor) {
    impl->floor_ = *floor;
    impl->trust_.SetFloor(floor->seq, floor->hash);
  }
  if (impl->integrity_.enabled()) {  // (rows are checked, and sealed, only then)
    CUSTOS_ASSIGN_OR_RETURN(
        const bool sealed,
        RowEverRecorded(*impl->db_, SettingRowName(kCatalogSealedSetting), impl->floor_.seq));
    impl->integrity_.set_unsealed_catalog(!sealed);
  }
  if (last) {
    CUSTOS_ASSIGN_OR_RETURN(impl->chain_, audit::Chain::Resume(last->seq, last->hash));
  }
  impl->trust_.NoteCommitted(last ? last->seq : 0);
  return std::unique_ptr<KeyStore>(new KeyStore(std::move(impl)));
}

absl::Status KeyStore::CreateKey(const KeyRecord& key) {
  CUSTOS_RETURN_IF_ERROR(ValidateKey(key));
  auto record = Normalized(key);
  record->reserved_versions.clear();  // a new key has no reservations
  CUSTOS_ASSIGN_OR_RETURN(record->mac, impl_->integrity_.Seal(CanonicalKeyRow(*record)));
  const auto since = std::chrono::steady_clock::now();
  std::lock_guard lock(impl_->db_mu_);
  const BusyBudget budget(*impl_->db_, since);
  CUSTOS_RETURN_IF_ERROR(impl_->NoteWrite([&]() -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    CUSTOS_RETURN_IF_ERROR(InsertKey(*impl_->db_, *record));
    return tx->Commit();
  }()));
  ++impl_->key_writes_;
  impl_->cache_.Put(std::move(record));  // Only once durable.
  return absl::OkStatus();
}

absl::Status KeyStore::Apply(const WriteBatch& batch) {
  // Key rows stamped from the database when the rows given were not up to date (a version
  // reserved since the row was last written), or a reservation came in between.
  for (int attempt = 1;; ++attempt) {
    bool restamp = false;
    absl::Status status = impl_->ApplyOnce(batch, /*read_reserved=*/attempt > 1, restamp);
    if (!restamp || attempt == 3) return status;
  }
}

absl::Status KeyStore::Impl::ApplyOnce(const WriteBatch& batch, bool read_reserved, bool& restamp) {
  Impl::Writer writer;
  writer.batch = &batch;
  CUSTOS_RETURN_IF_ERROR(Prepare(batch, writer, read_reserved));
  if (batch.keys.empty() && batch.requests.empty() && batch.settings.empty() &&
      batch.usage.empty() && batch.audit.empty() && !batch.archival) {
    return absl::OkStatus();
  }

  std::unique_lock queue_lock(queue_mu_);
  writers_.push_back(&writer);
  writer.cv.wait(queue_lock, [&] { return writer.done || writers_.front() == &writer; });
  if (writer.done) {  // a leader committed it
    restamp = writer.restamp;
    return writer.status;
  }

  // This writer leads: it commits everything queued so far as one group.
  constexpr size_t kMaxGroup = 512;
  std::vector<Impl::Writer*> group(
      writers_.begin(),
      writers_.begin() + static_cast<std::ptrdiff_t>(std::min(writers_.size(), kMaxGroup)));
  queue_lock.unlock();
  {
    std::lock_guard db_lock(db_mu_);
    const audit::Chain chain_before = chain_;
    const auto began = std::chrono::steady_clock::now();
    const BusyBudget budget(*db_, group.front()->queued);  // the oldest writer's
    absl::Status committed = [&]() -> absl::Status {
      CUSTOS_RETURN_IF_ERROR(write_fault_);
      CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*db_));
      for (Impl::Writer* w : group) {
        w->status = WriteInGroup(*w);
        // SQLite rolled the group's transaction back by itself: nothing of it is written, and
        // the next batch's SAVEPOINT would begin, and its RELEASE commit, a transaction of its
        // own, durable while its caller is told it failed.
        if (!w->status.ok() && sqlite3_get_autocommit(db_->handle()) != 0) {
          return w->status;
        }
      }
      CUSTOS_RETURN_IF_ERROR(MarkTail(chain_before.last_seq()));
      return tx->Commit();
    }();
    NoteWrite(committed).IgnoreError();
    NoteWrittenHeads(committed.ok());
    if (committed.ok()) {
      // Still under db_mu_, so before any reader can see the group's records; never on a
      // failure, which would leave the mark past records someone else may then insert.
      trust_.NoteCommitted(chain_.last_seq());
      if (std::any_of(group.begin(), group.end(),
                      [](const Impl::Writer* w) { return !w->records.empty(); })) {
        ++key_writes_;
      }
      const size_t durable = static_cast<size_t>(std::count_if(
          group.begin(), group.end(), [](const Impl::Writer* w) { return w->status.ok(); }));
      commit_stats_.transactions += 1;
      commit_stats_.batches += durable;
      if (commit_observer_) {
        commit_observer_(durable, std::chrono::steady_clock::now() - began);
      }
      for (const Impl::Writer* w : group) {
        if (w->status.ok() && w->batch->archival) {
          floor_ = w->batch->archival->floor;
          trust_.SetFloor(floor_.seq, floor_.hash);
        }
      }
    } else {  // nothing of the group is in the log
      chain_ = chain_before;
    }
    for (Impl::Writer* w : group) {
      if (!committed.ok()) {
        w->status = committed;
        w->restamp = false;  // nothing of the group is written: not a reason to try again
      }
      // Write-through once durable, still under db_mu_, so no load of an older copy can slip
      // in between the commit and these puts. A key written twice ends as its last.
      if (w->status.ok()) {
        for (auto& record : w->records) cache_.Put(std::move(record));
      }
    }
  }
  queue_lock.lock();
  for (Impl::Writer* w : group) {
    writers_.pop_front();
    if (w != &writer) {
      w->done = true;
      w->cv.notify_one();
    }
  }
  if (!writers_.empty()) writers_.front()->cv.notify_one();
  restamp = writer.restamp;
  return writer.status;
}

absl::Status KeyStore::PrepareTailMarks() {
  std::lock_guard lock(impl_->db_mu_);
  if (impl_->authenticator_ == nullptr || !impl_->tail_key_.empty()) return absl::OkStatus();
  return impl_->MakeTailKey();
}

void KeyStore::SetTailMarking(bool on) {
  std::lock_guard lock(impl_->db_mu_);
  impl_->tail_marking_ = on;
}

absl::Status KeyStore::ResumeTailMarks() {
  std::lock_guard lock(impl_->db_mu_);
  impl_->tail_marking_ = true;
  if (impl_->authenticator_ == nullptr || impl_->chain_.last_seq() == 0) return absl::OkStatus();
  if (impl_->tail_key_.empty()) CUSTOS_RETURN_IF_ERROR(impl_->MakeTailKey());
  return impl_->NoteWrite([&]() -> absl::Status {
    CUSTOS_RETURN_IF_ERROR(impl_->write_fault_);
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    CUSTOS_RETURN_IF_ERROR(WriteTailMark(*impl_->db_, {impl_->chain_.last_seq(), impl_->tail_nonce_,
                                                       TailMac(impl_->tail_key_, impl_->chain_)}));
    return tx->Commit();
  }());
}

absl::Status KeyStore::CheckAuditTail(uint64_t head_seq) {
  std::lock_guard lock(impl_->db_mu_);
  const uint64_t last = impl_->chain_.last_seq();
  if (impl_->authenticator_ == nullptr || last <= head_seq) return absl::OkStatus();
  const std::string span =
      StrCat("the audit log goes on from record ", head_seq, " (the HSM's head) to record ", last);
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<TailMark> mark, LoadTailMark(*impl_->db_));
  if (!mark.has_value()) {
    return absl::FailedPreconditionError(
        StrCat(span,
               ", but no record carries the mark of the server that wrote it: records "
               "were added while custosd was stopped (or this state, from before tail marks, was "
               "not stopped cleanly before the upgrade)"));
  }
  if (mark->seq != last) {
    return absl::FailedPreconditionError(
        StrCat(span, ", but the server that wrote it marked record ", mark->seq,
               " as its newest: records were added or removed while custosd was stopped"));
  }
  CUSTOS_ASSIGN_OR_RETURN(const SecureBytes key, impl_->TailKey(mark->nonce));
  const Bytes expected = TailMac(key, impl_->chain_);
  if (mark->mac.size() != expected.size() ||
      CRYPTO_memcmp(mark->mac.data(), expected.data(), expected.size()) != 0) {
    return absl::FailedPreconditionError(
        StrCat(span,
               ", but its newest record does not carry the mark of this HSM: records were "
               "added or changed while custosd was stopped"));
  }
  return absl::OkStatus();
}

absl::Status KeyStore::PurgeErased() {
  std::lock_guard lock(impl_->db_mu_);
  // A reader on another connection (an auditor's sqlite3, a backup) holds the checkpoint up
  // as long as it reads, and every commit waits meanwhile (the checkpoint holds db_mu_ and
  // SQLite's write lock): a short wait, then UNAVAILABLE, and the next maintenance turn retries.
  const BusyBudget budget(*impl_->db_, std::chrono::steady_clock::now(), kPurgeBusyTimeout);
  // Copies every page into the database file (where secure_delete has zeroed what was
  // erased) and truncates the WAL to nothing, so no frame with the old material survives.
  CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement stmt,
                          impl_->db_->Prepare("PRAGMA wal_checkpoint(TRUNCATE)"));
  CUSTOS_ASSIGN_OR_RETURN(const bool row, stmt.Step());
  if (!row) return absl::InternalError("PRAGMA wal_checkpoint returned no row");
  // (busy, frames in the WAL, frames checkpointed). busy: a reader or writer on another
  // connection kept the checkpoint from finishing within the busy timeout.
  if (stmt.ColumnInt64(0) != 0) {
    return absl::UnavailableError(
        absl::StrCat("could not checkpoint the key database's WAL: another connection is using "
                     "it (",
                     stmt.ColumnInt64(1), " frames, ", stmt.ColumnInt64(2),
                     " checkpointed); erased material may remain in the WAL until a retry "
                     "succeeds"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::optional<RowRecord>>> KeyStore::Impl::RecordedRequests(
    const std::vector<RequestRecord>& requests) {
  std::vector<std::optional<RowRecord>> recorded;
  if (!integrity_.enabled()) return recorded;
  for (const RequestRecord& request : requests) {
    CUSTOS_ASSIGN_OR_RETURN(recorded.emplace_back(), Listed(RequestRowName(request.id)));
  }
  return recorded;
}

absl::StatusOr<RequestRecord> KeyStore::GetRequest(std::string_view id) const {
  std::optional<RequestRecord> request;
  std::optional<RowRecord> recorded;
  {
    std::lock_guard lock(impl_->db_mu_);
    CUSTOS_ASSIGN_OR_RETURN(request, LoadRequest(*impl_->db_, id));
    if (!request.has_value()) {
      CUSTOS_RETURN_IF_ERROR(impl_->Missing(RequestRowName(id)));
      return absl::NotFoundError(StrCat("no request with id '", id, "'"));
    }
    if (impl_->integrity_.enabled()) {
      CUSTOS_ASSIGN_OR_RETURN(recorded, impl_->Recorded(RequestRowName(request->id)));
    }
  }
  CUSTOS_RETURN_IF_ERROR(impl_->CheckRequest(*request, recorded));
  return *std::move(request);
}

absl::StatusOr<RequestPage> KeyStore::ListRequests(const RequestFilter& filter, size_t page_size,
                                                   std::string_view page_token) const {
  CUSTOS_RETURN_IF_ERROR(CheckPageSize(page_size));
  CUSTOS_ASSIGN_OR_RETURN(const auto after, DecodeRequestToken(page_token));
  std::vector<RequestRecord> requests;
  std::vector<std::optional<RowRecord>> recorded;
  {
    std::lock_guard lock(impl_->db_mu_);
    // One extra row tells whether another page follows.
    CUSTOS_ASSIGN_OR_RETURN(requests, LoadRequests(*impl_->db_, filter, after, page_size + 1));
    CUSTOS_ASSIGN_OR_RETURN(recorded, impl_->RecordedRequests(requests));
  }
  RequestPage page;
  if (requests.size() > page_size) {
    requests.resize(page_size);
    page.next_page_token = EncodeRequestToken(requests.back());
  }
  // Listed even if it fails its check (officers must see it), with the reason.
  for (size_t i = 0; i < requests.size() && i < recorded.size(); ++i) {
    absl::Status checked = impl_->CheckRequest(requests[i], recorded[i]);
    if (absl::IsUnavailable(checked)) return checked;
    if (!checked.ok()) requests[i].integrity_problem = std::string(checked.message());
  }
  page.requests = std::move(requests);
  return page;
}

absl::StatusOr<std::vector<RequestRecord>> KeyStore::PendingRequests() const {
  std::vector<RequestRecord> requests;
  std::vector<std::optional<RowRecord>> recorded;
  {
    std::lock_guard lock(impl_->db_mu_);
    CUSTOS_ASSIGN_OR_RETURN(requests, LoadPendingRequests(*impl_->db_));
    CUSTOS_ASSIGN_OR_RETURN(recorded, impl_->RecordedRequests(requests));
  }
  // Only what passes its check: the server acts on these (expiry), and acting on a forged or
  // rolled-back request would seal it anew.
  std::vector<RequestRecord> checked;
  for (size_t i = 0; i < requests.size(); ++i) {
    if (i < recorded.size()) {
      absl::Status status = impl_->CheckRequest(requests[i], recorded[i]);
      if (absl::IsUnavailable(status)) return status;
      if (!status.ok()) continue;
    }
    checked.push_back(std::move(requests[i]));
  }
  return checked;
}

absl::StatusOr<std::vector<std::string>> KeyStore::KeysDueForDeletion(int64_t now,
                                                                      int64_t observed) const {
  std::lock_guard lock(impl_->db_mu_);
  return SelectKeysDueForDeletion(*impl_->db_, now, observed);
}

absl::StatusOr<std::vector<std::string>> KeyStore::KeysDueForRotation(int64_t now) const {
  std::lock_guard lock(impl_->db_mu_);
  return SelectKeysDueForRotation(*impl_->db_, now);
}

absl::StatusOr<uint64_t> KeyStore::CountVersionsUnderRoot(std::string_view label) const {
  std::lock_guard lock(impl_->db_mu_);
  return storage::CountVersionsUnderRoot(*impl_->db_, label);
}

absl::StatusOr<std::map<std::string, uint64_t>> KeyStore::CountVersionsChecked(
    const std::set<std::string>& labels) const {
  std::map<std::string, uint64_t> counts;
  for (const std::string& label : labels) counts[label] = 0;
  std::string token;
  do {
    CUSTOS_ASSIGN_OR_RETURN(const KeyPage page, ListKeys(kMaxPageSize, token));
    for (const std::shared_ptr<const KeyRecord>& key : page.keys) {
      if (!key->integrity_problem.empty()) {  // the listing's refusal, as a read returns it
        absl::Status refused = absl::DataLossError(key->integrity_problem);
        refused.SetPayload(kIntegrityPayload, absl::Cord(KeyRowName(key->id)));
        return refused;
      }
      for (const KeyVersion& version : key->versions) {
        const auto counted = counts.find(version.root_key_label);
        if (!version.wrapped.empty() && counted != counts.end()) ++counted->second;
      }
    }
    token = page.next_page_token;
  } while (!token.empty());
  if (!impl_->integrity_.enabled()) return counts;
  // A key deleted whole (its row and versions) is not listed above.
  std::lock_guard lock(impl_->db_mu_);
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<std::string> missing,
                          FirstRecordedKeyWithoutRow(*impl_->db_, impl_->floor_.seq));
  if (missing.has_value()) CUSTOS_RETURN_IF_ERROR(impl_->Missing(*missing));
  return counts;
}

absl::StatusOr<std::map<std::string, uint64_t>> KeyStore::CountVersionsByRoot() const {
  std::lock_guard lock(impl_->db_mu_);
  return storage::CountVersionsByRoot(*impl_->db_);
}

absl::StatusOr<std::optional<std::string>> KeyStore::Impl::ReadCheckedSetting(
    std::string_view name, RowIntegrity::Chain chain, KeyStore::Absence absence, bool walked) {
  const bool checked = integrity_.enabled() && chain != RowIntegrity::Chain::kMacOnly;
  std::optional<StoredSetting> stored;
  std::optional<RowRecord> recorded;
  {
    std::lock_guard lock(db_mu_);
    CUSTOS_ASSIGN_OR_RETURN(stored, ReadSetting(*db_, name));
    if (stored.has_value() && checked) {
      CUSTOS_ASSIGN_OR_RETURN(recorded, Recorded(SettingRowName(name)));
    }
    // Custos never deletes a setting (it empties it): one the log records was deleted outside
    // it, and taking it for never set would drop what it guards. Deleted with the index
    // entries of every record naming it, only a walk of the whole live log shows it (no other
    // row names a setting), so its absence is believed only once the log is walked.
    // (Unanchored, every record is believed: tests, offline tools, custosd before its check.)
    if (!stored.has_value() && (!checked || absence == KeyStore::Absence::kHarmless ||
                                trust_.trusted_seq() <= floor_.seq)) {
      if (checked) CUSTOS_RETURN_IF_ERROR(Missing(SettingRowName(name)));
      return std::optional<std::string>();
    }
    if (!stored.has_value() && walked) {  // an archival moved the floor under the walk
      return absl::UnavailableError(StrCat(
          "setting ", name,
          " could not be read while the audit log was archived or anchored again; try again"));
    }
  }
  if (!stored.has_value()) {
    const absl::Status walk = VerifyLiveLog();  // once per anchoring, whichever read is first
    if (absl::IsFailedPrecondition(walk)) {
      absl::Status refused = absl::DataLossError(
          StrCat("catalogue row ", SettingRowName(name),
                 " is not in the database, and that is not believed: the audit log, walked to "
                 "see that no record names it, does not verify (",
                 walk.message(), ")"));
      // The alarm is the log's, raised once: the name may be a caller's (a token's), so it is
      // not remembered.
      refused.SetPayload(kIntegrityPayload, absl::Cord("audit_log"));
      return refused;
    }
    CUSTOS_RETURN_IF_ERROR(walk);
    return ReadCheckedSetting(name, chain, absence, /*walked=*/true);
  }
  CUSTOS_RETURN_IF_ERROR(integrity_.Check(SettingRowName(name),
                                          CanonicalSettingRow(name, stored->value), stored->mac,
                                          recorded, chain));
  return std::optional<std::string>(std::move(stored->value));
}

absl::StatusOr<std::optional<std::string>> KeyStore::GetSetting(std::string_view name,
                                                                Absence absence) const {
  return impl_->ReadCheckedSetting(name, RowIntegrity::Chain::kRecorded, absence);
}

absl::StatusOr<std::optional<std::string>> KeyStore::GetReplaySafeSetting(
    std::string_view name) const {
  return impl_->ReadCheckedSetting(name, RowIntegrity::Chain::kMacOnly);
}

absl::Status KeyStore::PutReplaySafeSetting(const std::string& name, const std::string& value) {
  if (name.empty()) return absl::InvalidArgumentError("a setting needs a name");
  CUSTOS_ASSIGN_OR_RETURN(const Bytes mac,
                          impl_->integrity_.Seal(CanonicalSettingRow(name, value)));
  const auto since = std::chrono::steady_clock::now();
  std::lock_guard lock(impl_->db_mu_);
  const BusyBudget budget(*impl_->db_, since);
  return impl_->NoteWrite([&]() -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    CUSTOS_RETURN_IF_ERROR(WriteSetting(*impl_->db_, name, value, mac));
    return tx->Commit();
  }());
}

absl::StatusOr<std::vector<VersionUsage>> KeyStore::GetUsage(std::string_view key_id) const {
  // The versions the key's checked row saw reserved: each must still hold its reservation,
  // and that reservation's newest record is then checked with every record after it.
  std::vector<uint32_t> reserved;
  if (impl_->integrity_.enabled()) {
    CUSTOS_ASSIGN_OR_RETURN(const std::shared_ptr<const KeyRecord> key, impl_->LoadChecked(key_id));
    if (key != nullptr) reserved = key->reserved_versions;
  }
  const auto was_reserved = [&](uint32_t version) {
    return std::binary_search(reserved.begin(), reserved.end(), version);
  };
  std::vector<VersionUsage> usage;
  std::vector<std::optional<RowRecord>> recorded;
  {
    std::lock_guard lock(impl_->db_mu_);
    CUSTOS_ASSIGN_OR_RETURN(usage, SelectUsage(*impl_->db_, key_id));
    for (size_t i = 0; i < usage.size() && impl_->integrity_.enabled(); ++i) {
      const std::string row = UsageRowName(usage[i].key_id, usage[i].version);
      CUSTOS_ASSIGN_OR_RETURN(recorded.emplace_back(), impl_->Recorded(row));
    }
    // A reservation deleted would restart its version's count at 0: a version without a row
    // must never have had one recorded.
    if (impl_->integrity_.enabled()) {
      CUSTOS_ASSIGN_OR_RETURN(const std::vector<uint32_t> unreserved,
                              SelectVersionsWithoutUsage(*impl_->db_, key_id));
      for (uint32_t version : unreserved) {
        const std::string row = UsageRowName(key_id, version);
        if (was_reserved(version)) {
          return impl_->integrity_.Refuse(
              row, StrCat("it is missing from the database although the row of key ", key_id,
                          " names version ", version, " as reserved (deleted outside Custos?)"));
        }
        CUSTOS_RETURN_IF_ERROR(impl_->Missing(row));
      }
    }
  }
  for (size_t i = 0; i < recorded.size(); ++i) {
    // A row no record names is one whose reservation was never made: it must say so, and its
    // key's row must not say otherwise.
    const auto chain = usage[i].encryptions_reserved == 0 && !was_reserved(usage[i].version)
                           ? RowIntegrity::Chain::kRecordedIfUsed
                           : RowIntegrity::Chain::kRecorded;
    CUSTOS_RETURN_IF_ERROR(impl_->integrity_.Check(UsageRowName(usage[i].key_id, usage[i].version),
                                                   CanonicalUsageRow(usage[i]), usage[i].mac,
                                                   recorded[i], chain));
  }
  return usage;
}

absl::StatusOr<std::vector<VersionUsage>> KeyStore::GetUsageUnchecked(
    std::string_view key_id) const {
  std::lock_guard lock(impl_->db_mu_);
  return SelectUsage(*impl_->db_, key_id);
}

absl::Status KeyStore::PutUsageCounts(const std::vector<VersionUsage>& usage) {
  for (const VersionUsage& u : usage) {
    if (u.key_id.empty() || u.version == 0) {
      return absl::InvalidArgumentError(StrCat("usage of key '", u.key_id, "' version ", u.version,
                                               ": needs a key id and a version >= 1"));
    }
  }
  if (usage.empty()) return absl::OkStatus();
  const auto since = std::chrono::steady_clock::now();
  std::lock_guard lock(impl_->db_mu_);
  const BusyBudget budget(*impl_->db_, since);
  return impl_->NoteWrite([&]() -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    for (const VersionUsage& u : usage) CUSTOS_RETURN_IF_ERROR(UpsertUsageCounts(*impl_->db_, u));
    return tx->Commit();
  }());
}

absl::StatusOr<std::shared_ptr<const KeyRecord>> KeyStore::Impl::LoadChecked(std::string_view id) {
  while (true) {
    std::shared_ptr<KeyRecord> key;
    std::optional<RowRecord> recorded;
    uint64_t writes = 0;
    {
      std::lock_guard lock(db_mu_);
      if (auto hit = cache_.FindById(id)) return hit;  // loaded or written while we waited
      CUSTOS_ASSIGN_OR_RETURN(key, LoadKey(*db_, id));
      if (key == nullptr) {
        CUSTOS_RETURN_IF_ERROR(Missing(KeyRowName(id)));
        return std::shared_ptr<const KeyRecord>();
      }
      if (!integrity_.enabled()) {
        cache_.Put(key);
        return key;
      }
      CUSTOS_ASSIGN_OR_RETURN(recorded, Recorded(KeyRowName(key->id)));
      writes = key_writes_;
    }
    // Outside the lock: it asks the HSM.
    CUSTOS_RETURN_IF_ERROR(integrity_.Check(KeyRowName(key->id), CanonicalKeyRow(*key), key->mac,
                                            recorded, RowIntegrity::Chain::kRecorded));
    std::lock_guard lock(db_mu_);
    if (auto hit = cache_.FindById(id)) return hit;
    if (key_writes_ != writes) continue;  // a write came in between: ours may be older
    cache_.Put(key);
    return key;
  }
}

absl::StatusOr<std::shared_ptr<const KeyRecord>> KeyStore::GetKey(std::string_view id) const {
  if (auto hit = impl_->cache_.FindById(id)) return hit;
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const KeyRecord> key, impl_->LoadChecked(id));
  if (key == nullptr) return NoKeyWithId(id);
  return key;
}

absl::StatusOr<std::shared_ptr<const KeyRecord>> KeyStore::FindKeyByAlias(
    std::string_view alias) const {
  const auto not_found = [&] {
    return absl::NotFoundError(absl::StrCat("no key with alias '", std::string(alias), "'"));
  };
  if (alias.empty()) return not_found();  // An empty alias means "none"; no key has it.
  if (auto hit = impl_->cache_.FindByAlias(alias)) return hit;
  std::optional<std::string> id;
  {
    std::lock_guard lock(impl_->db_mu_);
    if (auto hit = impl_->cache_.FindByAlias(alias)) return hit;
    CUSTOS_ASSIGN_OR_RETURN(id, FindKeyIdByAlias(*impl_->db_, alias));
  }
  if (!id.has_value()) return not_found();
  CUSTOS_ASSIGN_OR_RETURN(std::shared_ptr<const KeyRecord> key, impl_->LoadChecked(*id));
  // The alias column is not what decides: the checked row must carry the alias too.
  if (key == nullptr || key->alias != alias) return not_found();
  return key;
}

absl::StatusOr<KeyPage> KeyStore::ListKeys(size_t page_size, std::string_view page_token) const {
  CUSTOS_RETURN_IF_ERROR(CheckPageSize(page_size));
  CUSTOS_ASSIGN_OR_RETURN(const std::string after_id, DecodePageToken(page_token, "ListKeys"));
  std::vector<std::shared_ptr<KeyRecord>> keys;
  std::vector<std::optional<RowRecord>> recorded;
  {
    std::lock_guard lock(impl_->db_mu_);
    // One extra row tells whether another page follows. Listing bypasses the cache, so a
    // full scan does not evict the hot keys.
    CUSTOS_ASSIGN_OR_RETURN(keys, LoadKeysAfter(*impl_->db_, after_id, page_size + 1));
    if (keys.size() > page_size) keys.resize(page_size + 1);
    for (size_t i = 0; i < std::min(keys.size(), page_size) && impl_->integrity_.enabled(); ++i) {
      CUSTOS_ASSIGN_OR_RETURN(recorded.emplace_back(), impl_->Listed(KeyRowName(keys[i]->id)));
    }
  }
  KeyPage page;
  if (keys.size() > page_size) {
    keys.resize(page_size);
    page.next_page_token = EncodePageToken(keys.back()->id);
  }
  // A row that fails its check is listed, so that officers see it, with the reason. The MAC
  // of a row exactly as the cache holds it passed when it was cached (or was made here): it
  // is not computed again, so listing goes on while the HSM does not answer. The rest of the
  // check (the audit record vouching for the row, and that record's part of the log) runs.
  for (size_t i = 0; i < recorded.size(); ++i) {
    const Bytes canonical = CanonicalKeyRow(*keys[i]);
    const auto cached = impl_->cache_.PeekById(keys[i]->id);
    const bool mac_verified =
        cached != nullptr && cached->mac == keys[i]->mac && CanonicalKeyRow(*cached) == canonical;
    absl::Status checked =
        impl_->integrity_.Check(KeyRowName(keys[i]->id), canonical, keys[i]->mac, recorded[i],
                                RowIntegrity::Chain::kRecorded, mac_verified);
    if (absl::IsUnavailable(checked)) return checked;
    if (!checked.ok()) keys[i]->integrity_problem = std::string(checked.message());
  }
  page.keys.assign(std::make_move_iterator(keys.begin()), std::make_move_iterator(keys.end()));
  return page;
}

int KeyStore::SchemaVersion() const { return impl_->schema_version_; }

size_t KeyStore::CachedKeyCount() const { return impl_->cache_.size(); }

std::string_view RequestStateName(RequestState state) {
  switch (state) {
    case RequestState::kPending:
      return "PENDING";
    case RequestState::kExecuted:
      return "EXECUTED";
    case RequestState::kRejected:
      return "REJECTED";
    case RequestState::kExpired:
      return "EXPIRED";
    case RequestState::kFailed:
      return "FAILED";
  }
  return "UNKNOWN";
}

std::string_view KeyStateName(KeyState state) {
  switch (state) {
    case KeyState::kEnabled:
      return "ENABLED";
    case KeyState::kDisabled:
      return "DISABLED";
    case KeyState::kPendingDeletion:
      return "PENDING_DELETION";
    case KeyState::kDestroyed:
      return "DESTROYED";
  }
  return "UNKNOWN";
}

const KeyVersion* KeyRecord::FindVersion(uint32_t version) const {
  // Versions are few and ascending; a binary search would not pay for itself.
  for (const KeyVersion& v : versions) {
    if (v.version == version) return &v;
  }
  return nullptr;
}

void KeyStore::InjectWriteFault(absl::Status fault) {
  std::lock_guard lock(impl_->db_mu_);
  impl_->write_fault_ = std::move(fault);
}

absl::Status KeyStore::ProbeCommit(std::chrono::milliseconds busy_timeout) {
  const auto since = std::chrono::steady_clock::now();
  std::lock_guard lock(impl_->db_mu_);
  CUSTOS_RETURN_IF_ERROR(impl_->write_fault_);
  // The connection's busy timeout is the probe's while it runs: a health check must answer
  // before another connection's lock would let a real commit through.
  const BusyBudget budget(*impl_->db_, since, busy_timeout);
  absl::Status committed = [&]() -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    // An empty transaction writes nothing; setting a header field, even to its own value,
    // writes page 1, so the commit takes the disk's space and fsync like any other.
    CUSTOS_RETURN_IF_ERROR(
        impl_->db_->Exec(StrCat("PRAGMA user_version = ", impl_->schema_version_).c_str()));
    return tx->Commit();
  }();
  if (committed.ok()) impl_->WatchWalSize();
  return committed;
}

absl::Status KeyStore::WarnWalAbove(uint64_t warn_bytes) {
  if (warn_bytes < 2) return absl::InvalidArgumentError("the WAL warning size is too small");
  std::lock_guard lock(impl_->db_mu_);
  CUSTOS_RETURN_IF_ERROR(LimitKeptWal(*impl_->db_, warn_bytes));
  impl_->wal_warn_bytes_ = warn_bytes;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<audit::Record>> KeyStore::ReadAudit(uint64_t from_seq,
                                                               size_t limit) const {
  // Past SQLite's largest seq no record is (bound as int64, it would wrap to the start).
  if (from_seq > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return std::vector<audit::Record>();
  }
  std::lock_guard lock(impl_->db_mu_);
  // Archived records not yet removed (RemoveArchivedRecords) are not the live log's.
  return LoadAuditRecords(*impl_->db_, std::max(from_seq, impl_->floor_.seq + 1), limit);
}

absl::Status KeyStore::VerifyAuditChainFrom(uint64_t seq, std::span<const uint8_t> hash) const {
  constexpr size_t kPage = 1000;
  Bytes prev(hash.begin(), hash.end());
  uint64_t next = seq + 1;
  CUSTOS_ASSIGN_OR_RETURN(const AuditFloor floor, AuditLogFloor());
  if (seq > 0 && seq == floor.seq) {
    // The record is archived: the live log starts after it, from the floor's hash.
    if (floor.hash != prev) {
      return absl::FailedPreconditionError(StrCat("the archive floor at record ", seq,
                                                  " does not have the hash it was signed with"));
    }
  } else if (seq > 0) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<audit::Record> at, ReadAudit(seq, 1));
    if (at.empty() || at[0].seq != seq) {
      return absl::FailedPreconditionError(StrCat("the audit log has no record ", seq));
    }
    if (at[0].hash != prev) {
      return absl::FailedPreconditionError(
          StrCat("audit record ", seq, " does not have the hash it was signed with"));
    }
  }
  while (true) {
    CUSTOS_ASSIGN_OR_RETURN(std::vector<audit::Record> page, ReadAudit(next, kPage));
    for (const audit::Record& record : page) {
      if (record.seq != next) {
        return absl::FailedPreconditionError(
            StrCat("audit record ", next, " is missing (the log goes on at ", record.seq, ")"));
      }
      if (audit::ChainHash(prev, record) != record.hash) {
        return absl::FailedPreconditionError(
            StrCat("audit record ", record.seq,
                   " does not chain to the record before it (its content or hash was changed)"));
      }
      prev = record.hash;
      ++next;
    }
    // Records found changed are reported as such (a re-anchor may accept them); only intact
    // ones are held to their index entries.
    {
      std::lock_guard lock(impl_->db_mu_);
      CUSTOS_RETURN_IF_ERROR(impl_->CheckIndexed(page));
    }
    if (page.size() < kPage) break;
  }
  std::lock_guard lock(impl_->db_mu_);
  if (impl_->chain_.last_seq() != next - 1 || impl_->chain_.last_hash() != prev) {
    return absl::FailedPreconditionError("the audit log changed while it was being verified");
  }
  return absl::OkStatus();
}

void KeyStore::AnchorAuditLog(uint64_t seq, Bytes hash, bool rows_noted) {
  impl_->trust_.Anchor(seq, std::move(hash), rows_noted);
}

absl::Status KeyStore::VerifyOlderAuditRecords(uint64_t budget) {
  return impl_->trust_.Extend(budget);
}

bool KeyStore::LiveLogWalked() const {
  std::lock_guard lock(impl_->db_mu_);
  return impl_->trust_.trusted_seq() <= impl_->floor_.seq;
}

absl::StatusOr<uint64_t> KeyStore::SealCatalog(
    const std::function<audit::Record(const std::string& row)>& record_for,
    const std::set<std::string>& replay_safe) {
  if (!impl_->integrity_.enabled()) return 0;
  uint64_t floor = 0, last = 0;
  {
    std::lock_guard lock(impl_->db_mu_);
    floor = impl_->floor_.seq;
    last = impl_->chain_.last_seq();
    CUSTOS_ASSIGN_OR_RETURN(
        const bool sealed,
        RowEverRecorded(*impl_->db_, SettingRowName(kCatalogSealedSetting), floor));
    if (sealed) return 0;
  }
  // Whatever is sealed now is believed for good: the whole log first, so that a record saying
  // the catalogue was sealed cannot have been renamed or removed to have it sealed again with
  // rows added outside Custos.
  if (absl::Status intact = last > floor ? impl_->trust_.Cover(floor + 1) : absl::OkStatus();
      !intact.ok()) {
    return absl::Status(
        intact.code(),
        StrCat("the catalogue is not marked sealed, and the audit log it would be sealed with does "
               "not verify, so nothing is sealed: ",
               intact.message()));
  }
  uint64_t rows = 0;
  // Keys a page at a time, each page one batch, written back as they are.
  std::string after;
  while (true) {
    std::vector<std::shared_ptr<KeyRecord>> page;
    {
      std::lock_guard lock(impl_->db_mu_);
      CUSTOS_ASSIGN_OR_RETURN(page, LoadKeysAfter(*impl_->db_, after, 500));
    }
    if (page.empty()) break;
    WriteBatch batch;
    for (const auto& key : page) {
      batch.keys.push_back(*key);
      batch.audit.push_back(record_for(KeyRowName(key->id)));
    }
    CUSTOS_RETURN_IF_ERROR(Apply(batch));
    rows += page.size();
    after = page.back()->id;
  }
  WriteBatch rest;
  std::vector<RequestRecord> requests;
  {
    std::lock_guard lock(impl_->db_mu_);
    CUSTOS_ASSIGN_OR_RETURN(
        requests, LoadRequests(*impl_->db_, {}, std::nullopt, std::numeric_limits<size_t>::max()));
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement usage_keys,
                            impl_->db_->Prepare("SELECT DISTINCT key_id FROM version_usage WHERE "
                                                "encryptions_reserved > 0"));
    while (true) {
      CUSTOS_ASSIGN_OR_RETURN(const bool row, usage_keys.Step());
      if (!row) break;
      const std::string key_id = usage_keys.ColumnText(0);
      CUSTOS_ASSIGN_OR_RETURN(std::vector<VersionUsage> usage, SelectUsage(*impl_->db_, key_id));
      for (VersionUsage& u : usage) {
        if (u.encryptions_reserved > 0) rest.usage.push_back(std::move(u));
      }
    }
    CUSTOS_ASSIGN_OR_RETURN(sqlite::Statement settings,
                            impl_->db_->Prepare("SELECT name, value FROM settings"));
    while (true) {
      CUSTOS_ASSIGN_OR_RETURN(const bool row, settings.Step());
      if (!row) break;
      rest.settings[settings.ColumnText(0)] = settings.ColumnText(1);
    }
  }
  for (RequestRecord& request : requests) {
    rest.audit.push_back(record_for(RequestRowName(request.id)));
    rest.requests.push_back(std::move(request));
  }
  for (const VersionUsage& u : rest.usage) {
    rest.audit.push_back(record_for(UsageRowName(u.key_id, u.version)));
  }
  for (auto it = rest.settings.begin(); it != rest.settings.end();) {
    if (replay_safe.count(it->first)) {
      CUSTOS_RETURN_IF_ERROR(PutReplaySafeSetting(it->first, it->second));
      it = rest.settings.erase(it);
    } else {
      rest.audit.push_back(record_for(SettingRowName(it->first)));
      ++it;
    }
  }
  rows += rest.requests.size() + rest.usage.size() + rest.settings.size();
  // Last, in the same transaction as the rest: the catalogue is sealed, for good.
  rest.settings[kCatalogSealedSetting] = "1";
  rest.audit.push_back(record_for(SettingRowName(kCatalogSealedSetting)));
  CUSTOS_RETURN_IF_ERROR(Apply(rest));
  impl_->integrity_.set_unsealed_catalog(false);
  return rows;
}

void KeyStore::ObserveCommits(CommitObserver observer) {
  std::lock_guard lock(impl_->db_mu_);
  impl_->commit_observer_ = std::move(observer);
}

absl::StatusOr<std::optional<std::string>> KeyStore::KeyGranting(std::string_view principal) const {
  std::lock_guard lock(impl_->db_mu_);
  return SelectKeyGranting(*impl_->db_, principal);
}

absl::StatusOr<std::map<KeyState, uint64_t>> KeyStore::CountKeysByState() const {
  std::map<KeyState, uint64_t> counts = {{KeyState::kEnabled, 0},
                                         {KeyState::kDisabled, 0},
                                         {KeyState::kPendingDeletion, 0},
                                         {KeyState::kDestroyed, 0}};
  std::lock_guard lock(impl_->db_mu_);
  CUSTOS_ASSIGN_OR_RETURN(const auto stored, storage::CountKeysByState(*impl_->db_));
  for (const auto& [state, count] : stored) counts[static_cast<KeyState>(state)] = count;
  return counts;
}

CommitStats KeyStore::GetCommitStats() const {
  std::lock_guard lock(impl_->db_mu_);
  return impl_->commit_stats_;
}

absl::StatusOr<AuditFloor> KeyStore::AuditLogFloor() const {
  std::lock_guard lock(impl_->db_mu_);
  AuditFloor floor = impl_->floor_;
  if (floor.seq == 0) floor.hash.assign(audit::kHashBytes, 0);
  return floor;
}

absl::StatusOr<uint64_t> KeyStore::LastRecordNaming(std::string_view row) const {
  std::lock_guard lock(impl_->db_mu_);
  CUSTOS_ASSIGN_OR_RETURN(const std::optional<RowRecord> recorded,
                          impl_->Recorded(std::string(row)));
  return recorded ? recorded->seq : 0;
}

absl::StatusOr<uint64_t> KeyStore::FirstAuditSeq() const {
  std::lock_guard lock(impl_->db_mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<audit::Record> first,
                          LoadAuditRecords(*impl_->db_, impl_->floor_.seq + 1, 1));
  return first.empty() ? 0 : first[0].seq;
}

absl::StatusOr<size_t> KeyStore::RemoveArchivedRecords(size_t limit) {
  const auto since = std::chrono::steady_clock::now();
  std::lock_guard lock(impl_->db_mu_);
  const BusyBudget budget(*impl_->db_, since);
  absl::StatusOr<size_t> removed = [&]() -> absl::StatusOr<size_t> {
    CUSTOS_RETURN_IF_ERROR(impl_->write_fault_);
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    CUSTOS_ASSIGN_OR_RETURN(const size_t count,
                            storage::RemoveArchivedRecords(*impl_->db_, impl_->floor_.seq, limit));
    CUSTOS_RETURN_IF_ERROR(tx->Commit());
    return count;
  }();
  impl_->NoteWrite(removed.status()).IgnoreError();
  return removed;
}

absl::StatusOr<size_t> KeyStore::CarryForwardRowRecords(uint64_t through_seq,
                                                        const CarryRecord& carry, size_t limit,
                                                        std::string& after) {
  // The whole live log must be known intact, and indexed, first: someone who can write the
  // file could otherwise hide the newer record naming a row (from the log or from its index,
  // before `through_seq` or after it) so that an older digest gets carried. (Outside db_mu_:
  // Cover reads through it.)
  const absl::Status covered = impl_->VerifyLiveLog();
  if (!covered.ok()) {
    return absl::IsFailedPrecondition(covered)
               ? absl::FailedPreconditionError(
                     StrCat("not archiving through record ", through_seq,
                            ": the audit log does not verify: ", covered.message()))
               : covered;
  }
  const auto since = std::chrono::steady_clock::now();
  std::lock_guard lock(impl_->db_mu_);
  const BusyBudget budget(*impl_->db_, since);
  const audit::Chain chain_before = impl_->chain_;
  absl::StatusOr<size_t> carried = [&]() -> absl::StatusOr<size_t> {
    CUSTOS_RETURN_IF_ERROR(impl_->write_fault_);
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    std::string next = after;  // moved on only once the page is committed
    CUSTOS_ASSIGN_OR_RETURN(const size_t count,
                            impl_->CarryForward(through_seq, carry, limit, next));
    CUSTOS_RETURN_IF_ERROR(impl_->MarkTail(chain_before.last_seq()));
    CUSTOS_RETURN_IF_ERROR(tx->Commit());
    after = std::move(next);
    return count;
  }();
  impl_->NoteWrittenHeads(carried.ok());
  if (carried.ok()) {
    impl_->trust_.NoteCommitted(impl_->chain_.last_seq());
  } else {
    impl_->chain_ = chain_before;
  }
  impl_->NoteWrite(carried.status()).IgnoreError();
  return carried;
}

absl::StatusOr<std::pair<uint64_t, Bytes>> KeyStore::AuditHead() const {
  std::lock_guard lock(impl_->db_mu_);
  return std::make_pair(impl_->chain_.last_seq(), impl_->chain_.last_hash());
}

std::optional<std::pair<uint64_t, Bytes>> KeyStore::AuditHeadIfIdle() const {
  std::unique_lock lock(impl_->db_mu_, std::try_to_lock);
  if (!lock.owns_lock()) return std::nullopt;
  return std::make_pair(impl_->chain_.last_seq(), impl_->chain_.last_hash());
}

absl::Status KeyStore::PutCheckpoint(const audit::Checkpoint& checkpoint) {
  std::lock_guard lock(impl_->db_mu_);
  return impl_->NoteWrite([&]() -> absl::Status {
    CUSTOS_ASSIGN_OR_RETURN(auto tx, sqlite::Transaction::Begin(*impl_->db_));
    CUSTOS_RETURN_IF_ERROR(InsertCheckpoint(*impl_->db_, checkpoint));
    return tx->Commit();
  }());
}

absl::StatusOr<std::optional<audit::Checkpoint>> KeyStore::LatestCheckpoint() const {
  std::lock_guard lock(impl_->db_mu_);
  CUSTOS_ASSIGN_OR_RETURN(std::vector<audit::Checkpoint> latest, LoadCheckpoints(*impl_->db_, 1));
  if (latest.empty()) return std::optional<audit::Checkpoint>();
  return std::optional<audit::Checkpoint>(std::move(latest.front()));
}

absl::StatusOr<std::vector<audit::Checkpoint>> KeyStore::ReadCheckpoints(uint64_t from_seq,
                                                                         size_t limit) const {
  CUSTOS_RETURN_IF_ERROR(CheckPageSize(limit));
  if (from_seq > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    return std::vector<audit::Checkpoint>();
  }
  std::lock_guard lock(impl_->db_mu_);
  return LoadCheckpointsFrom(*impl_->db_, from_seq, limit);
}

absl::StatusOr<std::vector<audit::Checkpoint>> KeyStore::Checkpoints() const {
  std::lock_guard lock(impl_->db_mu_);
  return LoadCheckpoints(*impl_->db_, 0);
}

}  // namespace custos::storage
