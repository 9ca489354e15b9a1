// Raw SQL on a database file, over a connection of its own: what someone holding the file (a
// DBA, root on the host) can do behind custosd's back, and how tests read what is stored.
#pragma once

#include <string>

namespace custos::testing {

// The first column of the first row `sql` returns, as text ("" if none). REQUIREs success.
std::string SqlQuery(const std::string& db_path, const std::string& sql);

// Runs `sql` (any number of statements); "" on success, else SQLite's message.
std::string SqlExec(const std::string& db_path, const std::string& sql);

}  // namespace custos::testing
