//! `wavegen data fetch|list` and `wavegen completions`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use wavegen::tasks::fetch::{self, DATASETS, FetchOptions, Status};

use super::report::Bars;

#[derive(Debug, Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Download datasets into the data folder, checked against their SHA-256 sums; an
    /// interrupted download resumes where it stopped.
    Fetch(FetchArgs),
    /// Show which datasets are present, missing or damaged in the data folder.
    List(ListArgs),
}

#[derive(Debug, Args)]
struct FetchArgs {
    /// Datasets to fetch: fsdd, mnist, binarized_mnist, music16k [default: all that can be downloaded].
    names: Vec<String>,
    /// Data folder [env: WAVEGEN_DATA; default: datasets].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Download every file from MIRROR/FILE instead of its public address (a local copy).
    #[arg(long)]
    mirror: Option<String>,
}

#[derive(Debug, Args)]
struct ListArgs {
    /// Data folder [env: WAVEGEN_DATA; default: datasets].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: DataArgs) -> anyhow::Result<ExitCode> {
    match a.command {
        DataCommand::Fetch(a) => {
            let data = super::data_dir(a.data);
            let names: Vec<String> = if a.names.is_empty() {
                DATASETS.iter().filter(|d| d.name != "music16k").map(|d| d.name.to_string()).collect()
            } else {
                a.names
            };
            for name in &names {
                fetch::dataset(name)?; // every name is checked before anything is downloaded
            }
            let opts = FetchOptions { mirror: a.mirror };
            for name in &names {
                let mut bars = Bars::new(false);
                let r = fetch::fetch(name, &data, &opts, &mut bars);
                bars.finish();
                let r = r?;
                eprintln!(
                    "{name}: {} file(s) fetched, {} already there, in {}",
                    r.fetched,
                    r.already_present,
                    data.join(name).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DataCommand::List(a) => {
            let data = super::data_dir(a.data);
            let all: Vec<(&str, Status)> = DATASETS.iter().map(|d| (d.name, d.status(&data))).collect();
            if a.json {
                let map: serde_json::Map<String, serde_json::Value> =
                    all.iter().map(|(n, s)| (n.to_string(), serde_json::to_value(s).expect("plain data"))).collect();
                super::print_json(&serde_json::json!({ "data": data, "datasets": map }))?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("data folder {}", data.display());
            for (d, (name, status)) in DATASETS.iter().zip(&all) {
                let state = match status {
                    Status::Present { files } => format!("present ({files} files, checksums right)"),
                    Status::Missing => format!("missing: wavegen data fetch {name}"),
                    Status::Incomplete { missing, corrupt } => format!(
                        "incomplete: {} missing, {} damaged{}: wavegen data fetch {name}",
                        missing.len(),
                        corrupt.len(),
                        corrupt.first().or(missing.first()).map_or(String::new(), |f| format!(" (e.g. {f})"))
                    ),
                    Status::Different { files } => {
                        format!("present, {files} files differ from the reference rendering (another FluidSynth?)")
                    }
                };
                println!("{name:<16} {state}\n{:<16} {}", "", d.about);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `wavegen completions SHELL`: the shell's completion script on stdout.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// bash, zsh, fish, powershell or elvish.
    shell: clap_complete::Shell,
}

pub fn completions(a: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = <super::Cli as clap::CommandFactory>::command();
    clap_complete::generate(a.shell, &mut cmd, "wavegen", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}
