// commands.hpp: the subcommands of `vattn`; each registers itself on the app.
#pragma once

#include <CLI/CLI.hpp>

namespace vattn::cli {

void add_demo(CLI::App& app, bool& json);
void add_check(CLI::App& app, bool& json);
void add_synth(CLI::App& app, bool& json);
void add_bench(CLI::App& app, bool& json);

}  // namespace vattn::cli
