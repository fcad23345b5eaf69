//! `collm quickstart`: the main job on the embedded default (the synthetic dataset).

use crate::data::SyntheticArgs;
use anyhow::Result;
use clap::Args;
use collm_data::dataset::write_dataset;
use collm_data::sources::synthetic;
use collm_data::stats;
use std::path::PathBuf;

#[derive(Args)]
pub struct QuickstartArgs {
    /// Where to write the dataset and results.
    #[arg(long, default_value = "runs/quickstart")]
    pub out: PathBuf,
    #[command(flatten)]
    pub synthetic: SyntheticArgs,
}

pub fn run(args: QuickstartArgs) -> Result<()> {
    let data_dir = args.out.join("data");
    let ds = write_dataset(
        synthetic::prepare(&args.synthetic.options())?,
        &data_dir,
        true,
    )?;
    println!("Prepared the synthetic dataset in {}\n", data_dir.display());
    print!("{}", stats::render(&stats::compute(&ds)?));
    Ok(())
}
