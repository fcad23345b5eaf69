//! A ready split in the TSV layout of the shared `ml-1m-collm` data: `train.tsv`, `valid.tsv`,
//! optional `test.tsv` (`uid iid label timestamp history`) and `items.tsv` (`iid title`).
//! Rows and histories are taken as given; every id must have a title.

use crate::dataset::{
    check_titles, describe_source_file, read_items_tsv, read_split_tsv, PreparedData, SourceInfo,
    Split, ITEMS_FILE,
};
use anyhow::{bail, Result};
use std::path::Path;

pub fn prepare(input: &Path, name: Option<&str>, item_noun: &str) -> Result<PreparedData> {
    let items_path = input.join(ITEMS_FILE);
    if !input.is_dir() {
        bail!("{}: not a directory", input.display());
    }
    let mut files = Vec::new();
    let titles = if items_path.is_file() {
        read_items_tsv(&items_path)?
    } else {
        bail!(
            "{}: not found (a collm-tsv directory holds train.tsv, valid.tsv, optional test.tsv and items.tsv)",
            items_path.display()
        );
    };
    files.push(describe_source_file(&items_path)?);
    let mut splits = Vec::new();
    for (split, required) in [("train", true), ("valid", true), ("test", false)] {
        let path = input.join(format!("{split}.tsv"));
        if !path.is_file() {
            if required {
                bail!("{}: not found (required split '{split}')", path.display());
            }
            continue;
        }
        let rows = read_split_tsv(&path)?;
        if rows.is_empty() {
            bail!(
                "{}: no rows after the header: expected at least one interaction",
                path.display()
            );
        }
        check_titles(&path, &rows, &titles)?;
        files.push(describe_source_file(&path)?);
        splits.push(Split {
            name: split.to_string(),
            rows,
        });
    }
    let name = name.map(str::to_string).unwrap_or_else(|| {
        input
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|s| s.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "collm-tsv".into())
    });
    Ok(PreparedData {
        name,
        item_noun: item_noun.to_string(),
        source: SourceInfo {
            kind: "collm-tsv".into(),
            files,
            params: Default::default(),
        },
        rule: "A ready split in collm TSV format, taken as given (rows, labels and histories unchanged).".into(),
        splits,
        titles,
    })
}
