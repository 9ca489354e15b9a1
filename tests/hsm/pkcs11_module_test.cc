#include "hsm/pkcs11_module.h"

#include <catch2/catch.hpp>

#include <dlfcn.h>

#include <filesystem>

#include "tests/support/softhsm_token.h"
#include "tests/support/temp_dir.h"

namespace custos::testing {
namespace {

using hsm::Pkcs11Module;

TEST_CASE("one module instance per library, finalised when its last owner lets go") {
  SoftHsmToken token;
  TempDir dir;
  const std::string link = dir.File("alias.so");
  std::filesystem::create_symlink(kSoftHsmModule, link);

  auto first = Pkcs11Module::Load(kSoftHsmModule);
  auto second = Pkcs11Module::Load(link);  // Another path to the same library.
  REQUIRE((first.ok() && second.ok()));
  CHECK(first->get() == second->get());

  std::weak_ptr<const Pkcs11Module> watch = *first;
  first->reset();
  CHECK_FALSE(watch.expired());
  second->reset();
  CHECK(watch.expired());

  auto again = Pkcs11Module::Load(kSoftHsmModule);  // Initialised afresh, and it works.
  REQUIRE(again.ok());
  CHECK((*again)->FindSlot(token.label()).ok());
}

// Kept mapped, a module's own leaks are reported under its name (and suppressed by it). A copy
// of the library, loaded by nothing else in this process, shows whether the last owner's
// dlclose unmapped it.
TEST_CASE("a module stays mapped after its last owner lets go") {
  SoftHsmToken token;
  TempDir dir;
  const std::string copy = dir.File("copy.so");
  std::filesystem::copy_file(kSoftHsmModule, copy);

  auto module = Pkcs11Module::Load(copy);
  REQUIRE(module.ok());
  CHECK((*module)->FindSlot(token.label()).ok());
  module->reset();

  void* mapped = dlopen(copy.c_str(), RTLD_NOW | RTLD_NOLOAD);
  CHECK(mapped != nullptr);
  if (mapped != nullptr) dlclose(mapped);
}

TEST_CASE("FindSlot finds a token by its space-padded label") {
  SoftHsmToken token("exactly-32-bytes-long-label-0123");
  auto module = Pkcs11Module::Load(kSoftHsmModule);
  REQUIRE(module.ok());
  CHECK((*module)->FindSlot("exactly-32-bytes-long-label-0123").ok());
  CHECK(absl::IsNotFound((*module)->FindSlot("exactly-32-bytes").status()));
  CHECK(absl::IsNotFound((*module)->FindSlot("exactly-32-bytes-long-label-01234").status()));
  CHECK(absl::IsNotFound((*module)->FindSlot("").status()));
}

}  // namespace
}  // namespace custos::testing
