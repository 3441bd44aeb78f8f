//! A small generated language with easy and hard tokens: the examples' corpus when nothing is
//! downloaded.
//!
//! Early exit pays when a model is sure of some tokens and unsure of others. Uniform random ids
//! ([`crate::data::create_synthetic_data`]) have no such tokens; real text has them but must be
//! fetched. This module writes short stories in a made-up language whose every token is, by
//! construction, one of three kinds:
//!
//! 1. **Frame words, easy** (about 70 % of the tokens). Each sentence is one of a dozen
//!    templates, and most of a template is fixed: after `once` always come `upon a time , in
//!    the land of`; after `every morning <name> walked to the <noun>` always `and back again .`.
//!    The frames use fifty English function words and punctuation marks (`the`, `.`, `,`,
//!    `was`, `of`, ...). Once a template has started, its next frame word follows from the last
//!    few tokens, which a shallow model learns quickly and then predicts with near certainty.
//!    (The first word of a sentence is a choice among the templates, so it is only fairly
//!    predictable.)
//! 2. **Open-class words, hard** (about 20 %). The template's slots take nouns, verbs,
//!    adjectives and passers-by's names drawn from made-up lexicons of thousands of words
//!    ([`NOUNS`], [`VERBS`], [`ADJECTIVES`], [`NAMES`]), each with a Zipf distribution (exponent
//!    [`ZIPF_EXPONENT`]): a few words are common (the commonest noun fills about a sixth of the
//!    noun slots), most are rare. What fills a slot is random and independent of everything
//!    before it, so even a perfect model can only spread its probability over the lexicon:
//!    these tokens stay uncertain at any depth (the irreducible part of the loss).
//! 3. **Long-context words** (about 10 %: the capitalised names and lands). Each story opens by
//!    naming its hero and its land (`in the land of <land> , there lived a <adj> <noun> named
//!    <hero>`), drawn uniformly from [`NAMES`] and [`LANDS`]; later sentences repeat them (`who
//!    <verb> the <noun> ? it was <hero> , of course .`, `in <land> the <noun> was always <adj>
//!    .`, and the closing `the end of the story of <hero> from <land> .`), and most sentences
//!    are about the hero. These tokens are determined, fully or mostly, but only by a word that
//!    may be hundreds of tokens back: predicting them means finding and copying it, an
//!    attention lookup that is harder to learn than the local frame and needs the context
//!    window to reach the opening. A model that has not learnt it sees ordinary random names.
//!
//! So a shallow model should be confident on kind 1 and unsure on kinds 2 and 3, and a deeper
//! model trained on its hard tokens has something to gain on kind 3 but little on kind 2.
//!
//! The text is lowercase apart from names and lands, with punctuation written as separate
//! words (`said that the mipo was very talky .`) so the word tokenizer sees clean tokens.
//! Sentences run on within a paragraph; paragraphs are separated by blank lines, so
//! [`crate::data::split_blocks`] can cut a story further.
//!
//! The lexicons are the same whatever the seed (they are built from a fixed seed): every corpus
//! speaks the same language, and `seed` picks only the stories. Story `i` depends only on `seed`
//! and `i`, not on how many stories are asked for.
//!
//! ```
//! use lego::data::synthetic::{SyntheticConfig, generate_corpus};
//!
//! let docs = generate_corpus(&SyntheticConfig { documents: 2, bytes_per_document: 600, seed: 1 });
//! assert_eq!(docs.len(), 2);
//! assert!(docs[0].text.starts_with("once upon a time , in the land of "));
//! assert_eq!(docs, generate_corpus(&SyntheticConfig { documents: 2, bytes_per_document: 600, seed: 1 }));
//! ```

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};

use super::text::Document;

/// How many made-up nouns the lexicon holds.
pub const NOUNS: usize = 3000;
/// How many made-up verbs (all in one past-tense form, ending in `-ed`).
pub const VERBS: usize = 1000;
/// How many made-up adjectives (ending in `-y`).
pub const ADJECTIVES: usize = 600;
/// How many made-up names (capitalised), for heroes and passers-by.
pub const NAMES: usize = 400;
/// How many made-up lands (capitalised, ending in `-ria`).
pub const LANDS: usize = 150;
/// The exponent of the Zipf distribution each slot is filled from: word `k` of a lexicon
/// (counting from 1) is drawn with probability proportional to `k^-1.1`.
pub const ZIPF_EXPONENT: f64 = 1.1;

/// The seed the lexicons are built from, the same for every corpus.
const LEXICON_SEED: u64 = 0x1E60;

/// How much text to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntheticConfig {
    /// How many stories (documents).
    pub documents: usize,
    /// Roughly how long each story is, in bytes; a story ends with the first sentence past this,
    /// plus its closing line. Every story has at least its opening and closing lines.
    pub bytes_per_document: usize,
    /// Picks the stories; the same seed always gives the same text.
    pub seed: u64,
}

/// 40 stories of about 10 KB each, about 400 KB and 80,000 words in all, seed 0.
impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig { documents: 40, bytes_per_document: 10_000, seed: 0 }
    }
}

/// Generates the corpus: `config.documents` stories named `story-001`, `story-002`, ...
/// (zero-padded to sort in order). See the [module docs](self) for the language.
pub fn generate_corpus(config: &SyntheticConfig) -> Vec<Document> {
    let lexicon = Lexicon::new();
    let mut seeds = StdRng::seed_from_u64(config.seed);
    let width = config.documents.to_string().len().max(3);
    (0..config.documents)
        .map(|i| {
            let mut rng = StdRng::seed_from_u64(seeds.random());
            Document {
                name: format!("story-{:0width$}", i + 1),
                text: story(&lexicon, config.bytes_per_document, &mut rng),
            }
        })
        .collect()
}

/// The made-up words, each class ordered from most to least frequent, and the Zipf
/// distributions that pick from them.
struct Lexicon {
    nouns: Vec<String>,
    verbs: Vec<String>,
    adjectives: Vec<String>,
    names: Vec<String>,
    lands: Vec<String>,
}

impl Lexicon {
    /// Builds every class from [`LEXICON_SEED`]: words of two or three random syllables with a
    /// class ending, all distinct from each other and from the frame words.
    fn new() -> Lexicon {
        let mut rng = StdRng::seed_from_u64(LEXICON_SEED);
        let mut taken: HashSet<String> = FRAME_WORDS.iter().map(|w| w.to_string()).collect();
        let mut class = |n: usize, make: &dyn Fn(&mut StdRng) -> String| -> Vec<String> {
            let mut words = Vec::with_capacity(n);
            while words.len() < n {
                let word = make(&mut rng);
                if taken.insert(word.to_lowercase()) {
                    words.push(word);
                }
            }
            words
        };
        Lexicon {
            nouns: class(NOUNS, &|r| {
                let syllables = r.random_range(2..=3);
                stem(r, syllables)
            }),
            verbs: class(VERBS, &|r| stem(r, 2) + "ed"),
            adjectives: class(ADJECTIVES, &|r| stem(r, 2) + "y"),
            names: class(NAMES, &|r| capitalise(&stem(r, 2))),
            lands: class(LANDS, &|r| capitalise(&stem(r, 2)) + "ria"),
        }
    }
}

/// `syllables` random consonant-vowel syllables, e.g. `"bako"`, `"trilema"`.
fn stem(rng: &mut StdRng, syllables: usize) -> String {
    const ONSETS: [&str; 18] =
        ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "tr", "ch", "sh"];
    const VOWELS: [&str; 7] = ["a", "e", "i", "o", "u", "ai", "ou"];
    let mut word = String::new();
    for _ in 0..syllables {
        word.push_str(ONSETS[rng.random_range(0..ONSETS.len())]);
        word.push_str(VOWELS[rng.random_range(0..VOWELS.len())]);
    }
    word
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// Every word the templates use outside their slots; the lexicons avoid them.
const FRAME_WORDS: [&str; 50] = [
    "once", "upon", "a", "time", ",", "in", "the", "land", "of", "there", "lived", "named", ".", "every",
    "morning", "walked", "to", "and", "back", "again", "said", "that", "was", "very", "so", "it", "who", "?",
    "course", "always", "is", "end", "story", "from", "one", "day", "met", "asked", "for", "counted", ":",
    "two", "three", "four", "five", "too", "then", "went", "home", "with",
];

/// One story: the opening, paragraphs of template sentences until `budget` bytes, the closing.
fn story(lex: &Lexicon, budget: usize, rng: &mut StdRng) -> String {
    let zipf = |n: usize| Zipf::new(n as f64, ZIPF_EXPONENT).expect("a lexicon is not empty");
    let (noun_z, verb_z, adj_z, name_z) =
        (zipf(lex.nouns.len()), zipf(lex.verbs.len()), zipf(lex.adjectives.len()), zipf(lex.names.len()));
    // Zipf samples are 1-based ranks.
    let pick = |words: &[String], z: &Zipf<f64>, rng: &mut StdRng| -> String {
        words[z.sample(rng) as usize - 1].clone()
    };
    // The hero and the land are drawn uniformly, so that they vary from story to story and
    // only the story's opening says which they are.
    let hero = lex.names[rng.random_range(0..lex.names.len())].clone();
    let land = lex.lands[rng.random_range(0..lex.lands.len())].clone();

    let mut text = format!(
        "once upon a time , in the land of {land} , there lived a {} {} named {hero} .",
        pick(&lex.adjectives, &adj_z, rng),
        pick(&lex.nouns, &noun_z, rng),
    );
    let mut sentences_left = 0;
    while text.len() < budget {
        if sentences_left == 0 {
            text.push_str("\n\n");
            sentences_left = rng.random_range(3..=7);
        } else {
            text.push(' ');
        }
        sentences_left -= 1;

        let noun = |rng: &mut StdRng| pick(&lex.nouns, &noun_z, rng);
        let verb = |rng: &mut StdRng| pick(&lex.verbs, &verb_z, rng);
        let adj = |rng: &mut StdRng| pick(&lex.adjectives, &adj_z, rng);
        // Most sentences are about the hero; the rest about someone from the name lexicon.
        let someone = |rng: &mut StdRng| {
            if rng.random_bool(0.6) { hero.clone() } else { pick(&lex.names, &name_z, rng) }
        };
        let sentence = match rng.random_range(0..12) {
            0 | 1 => format!("{} {} the {} .", someone(rng), verb(rng), noun(rng)),
            2 | 3 => format!("the {} {} {} the {} .", adj(rng), noun(rng), verb(rng), noun(rng)),
            4 => format!("every morning {} walked to the {} and back again .", someone(rng), noun(rng)),
            5 => format!("{} said that the {} was very {} .", someone(rng), noun(rng), adj(rng)),
            6 => "and so it was .".to_string(),
            7 => format!("who {} the {} ? it was {hero} , of course .", verb(rng), noun(rng)),
            8 => format!("in {land} the {} was always {} .", noun(rng), adj(rng)),
            9 => format!(
                "one day {hero} met {} and asked for a {} {} .",
                pick(&lex.names, &name_z, rng),
                adj(rng),
                noun(rng)
            ),
            10 => format!("{} counted : one , two , three , four , five .", someone(rng)),
            _ => format!("then {} went home with the {} too .", someone(rng), noun(rng)),
        };
        text.push_str(&sentence);
    }
    text.push_str(&format!("\n\nand that is the end of the story of {hero} from {land} .\n"));
    text
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::data::tokenizer::words;

    fn small(seed: u64) -> Vec<Document> {
        generate_corpus(&SyntheticConfig { documents: 8, bytes_per_document: 4_000, seed })
    }

    #[test]
    fn the_lexicon_is_distinct_and_avoids_frame_words() {
        let lex = Lexicon::new();
        let all: Vec<String> = [&lex.nouns, &lex.verbs, &lex.adjectives, &lex.names, &lex.lands]
            .into_iter()
            .flatten()
            .map(|w| w.to_lowercase())
            .collect();
        assert_eq!(all.len(), NOUNS + VERBS + ADJECTIVES + NAMES + LANDS);
        let distinct: HashSet<&String> = all.iter().collect();
        assert_eq!(distinct.len(), all.len());
        assert!(FRAME_WORDS.iter().all(|f| !distinct.contains(&f.to_string())));
        // Every template word is listed in FRAME_WORDS.
        let frames: HashSet<&str> = FRAME_WORDS.into_iter().collect();
        for doc in small(3) {
            for w in doc.text.split_whitespace() {
                assert!(
                    frames.contains(w) || distinct.contains(&w.to_lowercase()),
                    "{w:?} is neither a frame word nor in the lexicon"
                );
            }
        }
    }

    #[test]
    fn stories_are_deterministic_and_independent_of_the_count() {
        let a = small(5);
        assert_eq!(a, small(5));
        assert_ne!(a, small(6));
        let fewer = generate_corpus(&SyntheticConfig { documents: 3, bytes_per_document: 4_000, seed: 5 });
        assert_eq!(&a[..3], &fewer[..]);
        assert_eq!(a[0].name, "story-001");
        for doc in &a {
            assert!(doc.text.len() >= 4_000 && doc.text.len() < 4_300, "{}", doc.text.len());
        }
    }

    #[test]
    fn the_hero_named_at_the_start_returns_at_the_end() {
        for doc in small(1) {
            let first: Vec<String> = words(doc.text.lines().next().unwrap()).collect();
            let hero = &first[first.len() - 2]; // "... named <hero> ."
            let last: Vec<String> = words(doc.text.trim_end().lines().last().unwrap()).collect();
            assert_eq!(&last[last.len() - 4], hero, "{}", doc.name);
            assert_eq!(first[9], last[last.len() - 2], "the land returns too");
        }
    }

    #[test]
    fn frequent_words_dominate_and_the_tail_is_long() {
        let mut counts: HashMap<String, usize> = HashMap::new();
        for doc in small(0) {
            for w in words(&doc.text) {
                *counts.entry(w).or_insert(0) += 1;
            }
        }
        let mut sorted: Vec<usize> = counts.values().copied().collect();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let total: usize = sorted.iter().sum();
        let top: usize = sorted[..sorted.len() / 10].iter().sum();
        assert!(top * 2 > total, "top 10% of types cover {top} of {total} tokens");
        let once = sorted.iter().filter(|&&c| c == 1).count();
        assert!(once * 3 > sorted.len(), "{once} of {} types occur once", sorted.len());
    }
}
