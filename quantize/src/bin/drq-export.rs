//! `drq-export`: write any model source as a Hugging Face directory (safetensors + config.json +
//! tokenizer.json), e.g. to run the Hugging Face path on a GGUF model.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use model::source::{self, ModelSource};

#[derive(Parser)]
#[command(name = "drq-export", version, about = "Export a model source as a Hugging Face directory")]
struct Args {
    /// Model: hub repo id (owner/name[@rev]), Hugging Face directory, GGUF file, or `default`.
    #[arg(short, long, default_value = "default")]
    model: String,
    /// Directory to create.
    #[arg(short, long)]
    out: PathBuf,
}

fn main() {
    cli::run_main(|| run(Args::parse()));
}

fn run(args: Args) -> Result<()> {
    let source: ModelSource = args.model.parse()?;
    let (float, provenance) = source::load_float(&source)?;
    model::export::write_hf_dir(&float, &args.out)?;
    tracing::info!("exported {} (sha256 {}) to {}", provenance.source, provenance.sha256, args.out.display());
    Ok(())
}
