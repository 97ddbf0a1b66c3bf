// vattn_cli.cpp: the `vattn` command line: demo, check, synth, bench, info.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "commands.hpp"
#include "cpu/simd.hpp"
#include "vattn/vattn.hpp"

namespace {

nlohmann::json cpu_features() {
  nlohmann::json f = nlohmann::json::object();
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f["sse4.2"] = bool(__builtin_cpu_supports("sse4.2"));
  f["avx"] = bool(__builtin_cpu_supports("avx"));
  f["avx2"] = bool(__builtin_cpu_supports("avx2"));
  f["fma"] = bool(__builtin_cpu_supports("fma"));
  f["f16c"] = vattn::detail::cpu_has_f16c();
  f["avx512f"] = bool(__builtin_cpu_supports("avx512f"));
#endif
  return f;
}

void info(bool json) {
  nlohmann::json j = {
    {"version", vattn::version()},
    {"kernels", vattn::simd_level_name()},
    {"cpu_features", cpu_features()},
    {"hardware_threads", vattn::hardware_threads()},
#ifdef _OPENMP
    {"openmp", true},
#else
    {"openmp", false},
#endif
#if defined(__clang__)
    {"compiler", std::string("clang ") + __clang_version__},
#elif defined(__GNUC__)
    {"compiler", std::string("gcc ") + __VERSION__},
#endif
    {"cuda", false},
    {"kv_dtypes", {"f32", "f16", "bf16"}},
    {"layouts", {"contiguous", "paged"}},
  };
  if (json) {
    std::cout << j.dump(2) << "\n";
    return;
  }
  std::printf("vattn %s\n", vattn::version());
  std::printf("cpu kernels:      %s\n", vattn::simd_level_name());
  std::printf("cpu features:    ");
  for (auto& [k, v] : j["cpu_features"].items())
    if (v.get<bool>()) std::printf(" %s", k.c_str());
  std::printf("\nhardware threads: %d\n", vattn::hardware_threads());
  std::printf("openmp:           %s\n", j["openmp"].get<bool>() ? "yes" : "no");
  std::printf("compiler:         %s\n", j.value("compiler", "?").c_str());
  std::printf("cuda backend:     not built\n");
  std::printf("kv dtypes:        f32 f16 bf16; layouts: contiguous, paged\n");
}

// `vattn eval` is the Python package's (it drives HF models): hand the arguments to it.
int run_python_eval(const std::vector<std::string>& args) {
  std::vector<std::string> words = {"python3", "-m", "vattn", "eval"};
  words.insert(words.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& w : words) argv.push_back(w.data());
  argv.push_back(nullptr);
  execvp(argv[0], argv.data());
  std::fprintf(stderr,
               "vattn: error: eval runs the Python package (python3 -m vattn eval); could not "
               "start python3: %s\n",
               std::strerror(errno));
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"vattn: verified sparse attention for LLM decoding"};
  app.require_subcommand(1);
  bool json = false;
  app.add_flag("--json", json, "machine-readable output")->configurable();
  vattn::cli::add_demo(app, json);
  vattn::cli::add_check(app, json);
  vattn::cli::add_synth(app, json);
  vattn::cli::add_bench(app, json);
  CLI::App* ev = app.add_subcommand(
      "eval", "Accuracy on long-context tasks under each method (python3 -m vattn eval)");
  ev->prefix_command();  // every argument after `eval` goes to the Python command
  ev->set_help_flag();   // --help included
  int eval_status = 0;
  ev->callback([&] { eval_status = run_python_eval(ev->remaining()); });
  CLI::App* inf = app.add_subcommand("info", "Version, build options and detected CPU features");
  inf->callback([&json] { info(json); });
  // --json is accepted after the subcommand too.
  for (CLI::App* sub : app.get_subcommands({}))
    if (sub != ev) sub->add_flag("--json", json, "machine-readable output");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const vattn::error& e) {
    std::fprintf(stderr, "vattn: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "vattn: internal error: %s\n", e.what());
    return 3;
  }
  return eval_status;
}
