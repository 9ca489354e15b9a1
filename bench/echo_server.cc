// custos_echo_server: the transport's ceiling for custos_bench.
//
// Serves custos.bench.Echo/Ping (bench/echo.proto), an empty unary RPC answered at once by a
// callback-API handler, with the TLS settings custosd uses (server/tls.cc
// MutualTlsCredentials): the same certificate, key and client CA files through a
// FileWatcherCertificateProvider, a client certificate required and verified, and custosd's
// connection settings (maximum receive size, no SO_REUSEPORT, maximum connection age). It runs
// as its own process, as custosd does, so that its CPU time per call compares with custosd's.
// Stops on SIGTERM or SIGINT.
#include <signal.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <exception>
#include <fstream>
#include <memory>
#include <string>

#include <grpcpp/grpcpp.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include "echo.grpc.pb.h"

namespace custos::bench {
namespace {

// custosd's values (server/config.h, server/tls.h), repeated here: the bench does not link
// the server library.
constexpr int kMaxMessageBytes = 65536;
constexpr int kMaxConnectionAgeSeconds = 3600;
constexpr int kConnectionAgeGraceSeconds = 60;
constexpr unsigned kCertificateRefreshSeconds = 300;

class EchoService final : public Echo::CallbackService {
  grpc::ServerUnaryReactor* Ping(grpc::CallbackServerContext* context, const PingRequest*,
                                 PingResponse*) override {
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

struct Options {
  std::string listen = "127.0.0.1:0";
  std::string cert;
  std::string key;
  std::string client_ca;
  std::string port_file;
};

int Serve(const Options& options) {
  // Blocked before gRPC starts its threads, so that only sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      options.key, options.cert, options.client_ca, kCertificateRefreshSeconds);
  grpc::experimental::TlsServerCredentialsOptions tls(provider);
  tls.watch_root_certs();
  tls.watch_identity_key_cert_pairs();
  tls.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);

  EchoService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, grpc::experimental::TlsServerCredentials(tls), &port);
  builder.RegisterService(&service);
  builder.SetMaxReceiveMessageSize(kMaxMessageBytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, 0);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_MS, kMaxConnectionAgeSeconds * 1000);
  builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_AGE_GRACE_MS,
                             kConnectionAgeGraceSeconds * 1000);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "custos_echo_server: cannot listen on %s\n", options.listen.c_str());
    return 1;
  }
  if (!options.port_file.empty()) std::ofstream(options.port_file) << port << "\n";
  std::printf("custos_echo_server listening on %s (port %d)\n", options.listen.c_str(), port);
  std::fflush(stdout);
  int signal = 0;
  sigwait(&signals, &signal);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  return 0;
}

int Main(int argc, char** argv) {
  Options options;
  CLI::App app{"custos_echo_server: an empty RPC with custosd's TLS settings (custos_bench)"};
  app.add_option("--listen", options.listen, "address:port; port 0 picks a free one")
      ->capture_default_str();
  app.add_option("--cert", options.cert, "server certificate (PEM), as custosd's tls.cert")
      ->required();
  app.add_option("--key", options.key, "its private key (PEM), as tls.key")->required();
  app.add_option("--client-ca", options.client_ca,
                 "CA of the client certificates, as tls.client_ca")
      ->required();
  app.add_option("--port-file", options.port_file, "write the bound port here once listening");
  CLI11_PARSE(app, argc, argv);
  return Serve(options);
}

}  // namespace
}  // namespace custos::bench

int main(int argc, char** argv) {
  try {
    return custos::bench::Main(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "custos_echo_server: %s\n", e.what());
    return 2;
  }
}
