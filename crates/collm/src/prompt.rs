//! Prompt construction (paper §4.1, reference-spec §2): a template with the slots
//! `<ItemTitleList>` (the last 10 liked titles, quoted, comma-joined; `unkow` when there are
//! none, as the reference writes it), `<TargetItemTitle>` (quoted), `<UserID>` and
//! `<TargetItemID>` (ID slots), plus `<ItemNoun>` / `<ItemPlural>` for the dataset's wording
//! ("movie"/"movies", "book"/"books").
//!
//! ID slots are not text: a prompt is encoded piece by piece, and each ID slot becomes k
//! placeholder tokens whose **positions are recorded** while encoding. The hybrid encoder
//! replaces the embeddings at exactly those positions, so nothing depends on the placeholder
//! token being absent from the text (the reference searched for `<unk>` ids instead).

use anyhow::{bail, Context, Result};
use collm_data::Interaction;
use collm_llm::Tokenizer;
use std::path::Path;

pub const BUILTIN: [(&str, &str); 5] = [
    ("collm", include_str!("../templates/collm.txt")),
    ("tallrec", include_str!("../templates/tallrec.txt")),
    ("icl", include_str!("../templates/icl.txt")),
    ("softprompt", include_str!("../templates/softprompt.txt")),
    ("uitoken", include_str!("../templates/uitoken.txt")),
];

const SLOTS: [&str; 6] = [
    "<ItemTitleList>",
    "<TargetItemTitle>",
    "<UserID>",
    "<TargetItemID>",
    "<ItemNoun>",
    "<ItemPlural>",
];

/// What the reference writes when a user has no liked history yet.
pub const EMPTY_HISTORY: &str = "unkow";

#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    User,
    Item,
    /// Where the target part begins (no text; a piece boundary).
    TargetStart,
}

#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub text: String,
}

impl Template {
    /// A built-in template (`collm`, `tallrec`, `icl`, `softprompt`, `uitoken`) or a file.
    pub fn resolve(name_or_path: &str) -> Result<Self> {
        if let Some((n, t)) = BUILTIN.iter().find(|(n, _)| *n == name_or_path) {
            return Self::new(n, t);
        }
        let path = Path::new(name_or_path);
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "template '{name_or_path}': not a built-in ({}) and not a readable file",
                BUILTIN.map(|b| b.0).join(", ")
            )
        })?;
        Self::new(name_or_path, text.trim_end_matches(['\n', '\r']))
    }

    pub fn new(name: &str, text: &str) -> Result<Self> {
        // Every <…> that looks like a slot must be a known one.
        let mut rest = text;
        while let Some(start) = rest.find('<') {
            let tail = &rest[start..];
            if let Some(end) = tail.find('>') {
                let tag = &tail[..=end];
                let looks_like_slot = tag.len() > 2
                    && tag[1..tag.len() - 1]
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric());
                if looks_like_slot && !SLOTS.contains(&tag) {
                    bail!(
                        "template '{name}': unknown slot {tag} (known: {})",
                        SLOTS.join(", ")
                    );
                }
            }
            rest = &rest[start + 1..];
        }
        if !text.contains("<TargetItemTitle>") && !text.contains("<TargetItemID>") {
            bail!("template '{name}': needs <TargetItemTitle> or <TargetItemID>");
        }
        Ok(Self {
            name: name.into(),
            text: text.into(),
        })
    }

    pub fn has_id_slots(&self) -> bool {
        self.text.contains("<UserID>") || self.text.contains("<TargetItemID>")
    }
}

/// Fills a template for one interaction.
#[derive(Debug, Clone)]
pub struct PromptBuilder {
    pub template: Template,
    /// How many of the most recent liked titles to show.
    pub history: usize,
    /// Placeholder tokens per ID slot (k).
    pub tokens_per_slot: usize,
    pub item_noun: String,
}

fn quote(title: &str) -> String {
    format!("\"{}\"", title.trim())
}

impl PromptBuilder {
    pub fn new(template: Template, item_noun: &str) -> Self {
        Self {
            template,
            history: 10,
            tokens_per_slot: 1,
            item_noun: item_noun.into(),
        }
    }

    fn history_text(&self, row: &Interaction, titles: &[String]) -> String {
        let start = row.history.len().saturating_sub(self.history);
        let list: Vec<String> = row.history[start..]
            .iter()
            .filter_map(|&i| titles.get(i as usize))
            .filter(|t| !t.is_empty())
            .map(|t| quote(t))
            .collect();
        if list.is_empty() {
            EMPTY_HISTORY.into()
        } else {
            list.join(", ")
        }
    }

    /// Where the template's target part starts: at its first target slot
    /// (`<TargetItemTitle>` or `<TargetItemID>`), moved back over the whitespace before it, so
    /// that the boundary falls between two words (where a byte-level BPE splits anyway).
    fn target_start(&self) -> usize {
        let text = &self.template.text;
        let first = ["<TargetItemTitle>", "<TargetItemID>"]
            .iter()
            .filter_map(|t| text.find(t))
            .min()
            .expect("validated: a template has a target slot");
        text[..first].trim_end_matches([' ', '\t']).len()
    }

    /// The prompt as text and ID slots: the user part (instruction, history, `<UserID>`, …)
    /// then the target part, with a piece boundary between the two (see
    /// [`Encoded::target_start`]). Every prompt is encoded at these boundaries — in training,
    /// evaluation and shared-prefix scoring alike — so there is one tokenization.
    pub fn pieces(&self, row: &Interaction, titles: &[String]) -> Vec<Piece> {
        let (user, target) = self.template.text.split_at(self.target_start());
        let mut pieces = self.fill(user, row, titles);
        pieces.push(Piece::TargetStart);
        pieces.extend(self.fill(target, row, titles));
        pieces
    }

    fn fill(&self, template: &str, row: &Interaction, titles: &[String]) -> Vec<Piece> {
        let text = template
            .replace("<ItemPlural>", &format!("{}s", self.item_noun))
            .replace("<ItemNoun>", &self.item_noun)
            .replace("<ItemTitleList>", &self.history_text(row, titles))
            .replace(
                "<TargetItemTitle>",
                &quote(
                    titles
                        .get(row.iid as usize)
                        .map(String::as_str)
                        .unwrap_or(""),
                ),
            );
        let mut pieces = Vec::new();
        let mut rest = text.as_str();
        loop {
            let next = [("<UserID>", Piece::User), ("<TargetItemID>", Piece::Item)]
                .into_iter()
                .filter_map(|(tag, p)| rest.find(tag).map(|k| (k, tag, p)))
                .min_by_key(|(k, _, _)| *k);
            match next {
                None => {
                    if !rest.is_empty() {
                        pieces.push(Piece::Text(rest.to_string()));
                    }
                    break;
                }
                Some((k, tag, p)) => {
                    if k > 0 {
                        pieces.push(Piece::Text(rest[..k].to_string()));
                    }
                    pieces.push(p);
                    rest = &rest[k + tag.len()..];
                }
            }
        }
        pieces
    }

    /// The prompt as plain text, each ID slot shown as `placeholder` (k of them joined by ".").
    pub fn render(&self, row: &Interaction, titles: &[String], placeholder: &str) -> String {
        let slot = vec![placeholder; self.tokens_per_slot].join(".");
        self.pieces(row, titles)
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => t,
                Piece::User | Piece::Item => slot.clone(),
                Piece::TargetStart => String::new(),
            })
            .collect()
    }

    /// Token ids with the positions of the user and item slots (k each).
    pub fn encode(
        &self,
        tok: &Tokenizer,
        row: &Interaction,
        titles: &[String],
        placeholder_id: u32,
    ) -> Result<Encoded> {
        let mut e = Encoded::default();
        for p in self.pieces(row, titles) {
            match p {
                Piece::Text(t) => e.ids.extend(tok.encode(&t)?),
                Piece::TargetStart => e.target_start = e.ids.len(),
                Piece::User | Piece::Item => {
                    for _ in 0..self.tokens_per_slot {
                        let pos = e.ids.len();
                        if p == Piece::User {
                            e.user_slots.push(pos);
                        } else {
                            e.item_slots.push(pos);
                        }
                        e.ids.push(placeholder_id);
                    }
                }
            }
        }
        Ok(e)
    }
}

/// An encoded prompt.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub user_slots: Vec<usize>,
    pub item_slots: Vec<usize>,
    /// The first token of the target part (target title, `<TargetItemID>`, the answer cue):
    /// everything before it depends on the user alone and can be shared by all of that user's
    /// candidates.
    pub target_start: usize,
}

impl Encoded {
    /// Splits at token `at`: (the first `at` tokens, the rest), slot positions relative to
    /// each part.
    pub fn split_at(&self, at: usize) -> (Encoded, Encoded) {
        let part = |lo: usize, hi: usize| Encoded {
            ids: self.ids[lo..hi].to_vec(),
            user_slots: self
                .user_slots
                .iter()
                .filter(|&&p| (lo..hi).contains(&p))
                .map(|p| p - lo)
                .collect(),
            item_slots: self
                .item_slots
                .iter()
                .filter(|&&p| (lo..hi).contains(&p))
                .map(|p| p - lo)
                .collect(),
            target_start: self.target_start.saturating_sub(lo).min(hi - lo),
        };
        (part(0, at), part(at, self.ids.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(history: Vec<u32>) -> Interaction {
        Interaction {
            uid: 1,
            iid: 3,
            label: 1,
            timestamp: 0,
            history,
        }
    }

    fn titles() -> Vec<String> {
        [
            "",
            "Heat (1995)",
            "Toy Story (1995)",
            " Of Human Bondage (1934) ",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn collm_movie_prompt_is_the_reference_text() {
        let b = PromptBuilder::new(Template::resolve("collm").unwrap(), "movie");
        let got = b.render(&row(vec![1, 2]), &titles(), "<unk>");
        assert_eq!(
            got,
            "#Question: A user has given high ratings to the following movies: \"Heat (1995)\", \"Toy Story (1995)\". \
Additionally, we have information about the user's preferences encoded in the feature <unk>. Using all available \
information, make a prediction about whether the user would enjoy the movie titled \"Of Human Bondage (1934)\" with \
the feature <unk>? Answer with \"Yes\" or \"No\". \\n#Answer:"
        );
    }

    #[test]
    fn the_target_part_starts_between_two_words() {
        let b = PromptBuilder::new(Template::resolve("collm").unwrap(), "movie");
        let p = b.pieces(&row(vec![1]), &titles());
        let at = p.iter().position(|x| *x == Piece::TargetStart).unwrap();
        let Piece::Text(before) = &p[at - 1] else {
            panic!("{p:?}")
        };
        assert!(before.ends_with("would enjoy the movie titled"), "{before}");
        assert_eq!(
            p[at + 1],
            Piece::Text(" \"Of Human Bondage (1934)\" with the feature ".into())
        );
        // Split at the boundary, each part keeps its own slots.
        let e = Encoded {
            ids: (0..10).collect(),
            user_slots: vec![2],
            item_slots: vec![8],
            target_start: 6,
        };
        let (a, c) = e.split_at(6);
        assert_eq!(
            (a.ids.len(), a.user_slots, a.item_slots),
            (6, vec![2], vec![])
        );
        assert_eq!(
            (c.ids, c.user_slots, c.item_slots),
            (vec![6, 7, 8, 9], vec![], vec![2])
        );
    }

    #[test]
    fn tallrec_book_prompt_empty_history_and_last_ten() {
        let b = PromptBuilder::new(Template::resolve("tallrec").unwrap(), "book");
        let got = b.render(&row(vec![]), &titles(), "?");
        assert_eq!(
            got,
            "#Question: A user has given high ratings to the following books: unkow. Leverage the information to \
predict whether the user would enjoy the book titled \"Of Human Bondage (1934)\"? Answer with \"Yes\" or \"No\". \\n#Answer:"
        );
        let mut t = titles();
        for k in 4..20 {
            t.push(format!("T{k}"));
        }
        let long: Vec<u32> = (4..20).collect();
        let got = b.render(&row(long), &t, "?");
        assert!(got.contains("\"T10\", \"T11\""));
        assert!(!got.contains("\"T9\""));
        assert!(got.contains("\"T19\". Leverage"));
    }

    #[test]
    fn soft_prompt_slots_in_order_and_unknown_slots_rejected() {
        let b = PromptBuilder {
            tokens_per_slot: 3,
            ..PromptBuilder::new(Template::resolve("softprompt").unwrap(), "movie")
        };
        let p = b.pieces(&row(vec![1]), &titles());
        assert_eq!(p[1], Piece::User);
        assert_eq!(p[3], Piece::TargetStart);
        assert_eq!(p[4], Piece::Text(" ".into()));
        assert_eq!(p[5], Piece::Item);
        assert!(b
            .render(&row(vec![1]), &titles(), "u")
            .starts_with("#Question: u.u.u \"Heat (1995)\" [SEP] u.u.u \"Of"));
        let e = Template::new("x", "<UserId> <TargetItemTitle>").unwrap_err();
        assert!(format!("{e:#}").contains("unknown slot <UserId>"));
        assert!(Template::resolve("no-such-template").is_err());
    }
}
