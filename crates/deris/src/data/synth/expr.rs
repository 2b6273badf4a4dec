//! Referring expressions for a [`Scene`], with their exact referent sets.
//!
//! A description ([`Desc`]) names any of size, colour and shape ("the big red circle", "the
//! green shape", "the star"); it matches the objects that have all the named attributes. The
//! families of expressions, by kind:
//! - single target: a description that matches one object; a description that matches several,
//!   narrowed by a relation to a uniquely described anchor ("the red circle left of the blue
//!   square") or by an extreme ("the leftmost star");
//! - several targets: a plural description ("all triangles", "the two green shapes", "both
//!   stars"), a plural with a relation ("the circles above the big square"), two unique
//!   descriptions joined ("the red star and the blue circle");
//! - no target: a description that matches nothing ("the green star" when there is none, often a
//!   colour and a shape that are in the scene, not together), or a relation that no matching
//!   object satisfies.
//!
//! Relations and extremes compare centres and are only used where every compared object is
//! clearly on one side (by more than 5% of the image side), so that the referent set is never a
//! judgement call.

use super::scene::{Colour, Object, Scene, ShapeKind, SizeClass};
use crate::data::rng::SplitMix64;

/// How many objects an expression refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Single,
    Multi,
    NoTarget,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Single => "single",
            Self::Multi => "multi",
            Self::NoTarget => "no_target",
        }
    }
}

/// A sentence and the objects it refers to.
#[derive(Debug, Clone, PartialEq)]
pub struct Referring {
    pub text: String,
    /// Indices into the scene's objects, ascending; empty for no target.
    pub targets: Vec<usize>,
    pub kind: Kind,
    /// The family that produced it: `plain`, `relation`, `extreme`, `plural`, `conjunction`.
    pub family: &'static str,
}

/// Some of size, colour and shape (at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Desc {
    size: Option<SizeClass>,
    colour: Option<Colour>,
    shape: Option<ShapeKind>,
}

impl Desc {
    /// All 104 descriptions of the vocabulary.
    fn all() -> Vec<Desc> {
        let sizes = std::iter::once(None).chain(SizeClass::ALL.map(Some));
        let mut out = Vec::new();
        for size in sizes {
            for colour in std::iter::once(None).chain(Colour::ALL.map(Some)) {
                for shape in std::iter::once(None).chain(ShapeKind::ALL.map(Some)) {
                    if size.is_some() || colour.is_some() || shape.is_some() {
                        out.push(Desc { size, colour, shape });
                    }
                }
            }
        }
        out
    }

    fn matches(&self, o: &Object) -> bool {
        self.size.is_none_or(|s| s == o.size) && self.colour.is_none_or(|c| c == o.colour) && self.shape.is_none_or(|s| s == o.shape)
    }

    /// "big red circle", "green shapes".
    fn phrase(&self, plural: bool) -> String {
        let noun = self.shape.map_or("shape", ShapeKind::name);
        let words: Vec<&str> = [self.size.map(SizeClass::name), self.colour.map(Colour::name), Some(noun)].into_iter().flatten().collect();
        let s = words.join(" ");
        if plural {
            s + "s"
        } else {
            s
        }
    }
}

/// Where one object is relative to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relation {
    LeftOf,
    RightOf,
    Above,
    Below,
}

impl Relation {
    const ALL: [Relation; 4] = [Self::LeftOf, Self::RightOf, Self::Above, Self::Below];

    fn phrases(self) -> &'static [&'static str] {
        match self {
            Self::LeftOf => &["left of", "to the left of"],
            Self::RightOf => &["right of", "to the right of"],
            Self::Above => &["above"],
            Self::Below => &["below", "under"],
        }
    }

    /// Signed distance, positive when `o` is on this relation's side of `anchor`.
    fn offset(self, o: &Object, anchor: &Object) -> f64 {
        match self {
            Self::LeftOf => anchor.centre.0 - o.centre.0,
            Self::RightOf => o.centre.0 - anchor.centre.0,
            Self::Above => anchor.centre.1 - o.centre.1,
            Self::Below => o.centre.1 - anchor.centre.1,
        }
    }

    /// Extreme word: the object furthest towards this side.
    fn extreme(self) -> &'static str {
        match self {
            Self::LeftOf => "leftmost",
            Self::RightOf => "rightmost",
            Self::Above => "topmost",
            Self::Below => "bottommost",
        }
    }
}

/// An expression before its wording is chosen.
#[derive(Debug, Clone, Copy)]
enum Form {
    Plain(Desc),
    Relation { desc: Desc, relation: Relation, anchor: Desc, plural: bool },
    Extreme(Desc, Relation),
    Plural(Desc),
    Conjunction(Desc, Desc),
}

struct Candidate {
    form: Form,
    targets: Vec<usize>,
}

const NUMBERS: [&str; 7] = ["zero", "one", "two", "three", "four", "five", "six"];

/// Enumerates the expressions of one kind for a scene, grouped by family.
struct Enumerator<'a> {
    objects: &'a [Object],
    descs: Vec<(Desc, Vec<usize>)>,
    margin: f64,
}

impl<'a> Enumerator<'a> {
    fn new(scene: &'a Scene) -> Self {
        let objects = scene.objects.as_slice();
        let descs = Desc::all()
            .into_iter()
            .map(|d| (d, objects.iter().enumerate().filter(|(_, o)| d.matches(o)).map(|(i, _)| i).collect()))
            .collect();
        Self { objects, descs, margin: 0.05 * f64::from(scene.size) }
    }

    fn unique(&self) -> impl Iterator<Item = (Desc, usize)> + '_ {
        self.descs.iter().filter(|(_, m)| m.len() == 1).map(|(d, m)| (*d, m[0]))
    }

    /// Relation forms: `desc rel anchor` where every object matching `desc` (other than the
    /// anchor) is clearly on one side; referents = those on the relation's side.
    fn relations(&self) -> Vec<Candidate> {
        let mut out = Vec::new();
        for (desc, matched) in self.descs.iter().filter(|(_, m)| !m.is_empty()) {
            for (anchor_desc, a) in self.unique() {
                let others: Vec<usize> = matched.iter().copied().filter(|&i| i != a).collect();
                if others.is_empty() {
                    continue;
                }
                let anchor = &self.objects[a];
                for relation in Relation::ALL {
                    let offsets: Vec<f64> = others.iter().map(|&i| relation.offset(&self.objects[i], anchor)).collect();
                    if offsets.iter().any(|d| d.abs() <= self.margin) {
                        continue;
                    }
                    let targets: Vec<usize> = others.iter().zip(&offsets).filter(|(_, &d)| d > 0.0).map(|(&i, _)| i).collect();
                    let plural = targets.len() >= 2;
                    out.push(Candidate { form: Form::Relation { desc: *desc, relation, anchor: anchor_desc, plural }, targets });
                }
            }
        }
        out
    }

    /// The families for `kind`, each a list of candidates (possibly empty).
    fn families(&self, kind: Kind) -> Vec<Vec<Candidate>> {
        let relations = self.relations();
        match kind {
            Kind::Single => {
                let plain = self.unique().map(|(d, i)| Candidate { form: Form::Plain(d), targets: vec![i] }).collect();
                let relation = relations.into_iter().filter(|c| c.targets.len() == 1 && self.ambiguous(&c.form)).collect();
                let mut extreme = Vec::new();
                for (desc, matched) in self.descs.iter().filter(|(_, m)| m.len() >= 2) {
                    for relation in Relation::ALL {
                        // Sort by how far each object lies towards the side; demand a clear winner.
                        let mut by: Vec<(f64, usize)> = matched.iter().map(|&i| (relation.offset(&self.objects[i], &self.objects[matched[0]]), i)).collect();
                        by.sort_by(|a, b| b.0.total_cmp(&a.0));
                        if by[0].0 - by[1].0 > self.margin {
                            extreme.push(Candidate { form: Form::Extreme(*desc, relation), targets: vec![by[0].1] });
                        }
                    }
                }
                vec![plain, relation, extreme]
            }
            Kind::Multi => {
                let plural =
                    self.descs.iter().filter(|(_, m)| m.len() >= 2).map(|(d, m)| Candidate { form: Form::Plural(*d), targets: m.clone() }).collect();
                let relation = relations.into_iter().filter(|c| c.targets.len() >= 2).collect();
                let unique: Vec<(Desc, usize)> = self.unique().collect();
                let mut conjunction = Vec::new();
                for &(d1, i) in &unique {
                    for &(d2, j) in unique.iter().filter(|&&(_, j)| j != i) {
                        conjunction.push(Candidate { form: Form::Conjunction(d1, d2), targets: sorted(vec![i, j]) });
                    }
                }
                vec![plural, relation, conjunction]
            }
            Kind::NoTarget => {
                // Absent descriptions naming a colour or shape that is in the scene (hard negatives).
                let present = |d: &Desc| self.objects.iter().any(|o| d.colour == Some(o.colour) || d.shape == Some(o.shape));
                let plain = self
                    .descs
                    .iter()
                    .filter(|(d, m)| m.is_empty() && present(d))
                    .map(|(d, _)| Candidate { form: Form::Plain(*d), targets: Vec::new() })
                    .collect();
                let relation = relations.into_iter().filter(|c| c.targets.is_empty()).collect();
                vec![plain, relation]
            }
        }
    }

    /// A relation form whose description alone would match several objects (so the relation is
    /// needed); other forms are never "ambiguous".
    fn ambiguous(&self, form: &Form) -> bool {
        match form {
            Form::Relation { desc, .. } => self.descs.iter().any(|(d, m)| d == desc && m.len() >= 2),
            _ => false,
        }
    }
}

fn sorted(mut v: Vec<usize>) -> Vec<usize> {
    v.sort_unstable();
    v
}

fn words(form: &Form, targets: usize, rng: &mut SplitMix64) -> String {
    let pick = |rng: &mut SplitMix64, list: &[&'static str]| rng.pick(list).copied().unwrap_or_default();
    match *form {
        Form::Plain(d) => format!("the {}", d.phrase(false)),
        Form::Relation { desc, relation, anchor, plural } => {
            format!("the {} {} the {}", desc.phrase(plural), pick(rng, relation.phrases()), anchor.phrase(false))
        }
        Form::Extreme(d, relation) => format!("the {} {}", relation.extreme(), d.phrase(false)),
        Form::Plural(d) => {
            let number = NUMBERS.get(targets).copied().unwrap_or("many");
            let mut forms = vec![format!("all {}", d.phrase(true)), format!("the {}", d.phrase(true)), format!("the {number} {}", d.phrase(true))];
            if targets == 2 {
                forms.push(format!("both {}", d.phrase(true)));
            }
            rng.pick(&forms).cloned().unwrap_or_default()
        }
        Form::Conjunction(a, b) => format!("the {} and the {}", a.phrase(false), b.phrase(false)),
    }
}

/// One expression of `kind` for `scene`: a family chosen uniformly among those that have
/// candidates, then a candidate uniformly. `None` when the scene allows no expression of `kind`.
pub fn refer(scene: &Scene, kind: Kind, rng: &mut SplitMix64) -> Option<Referring> {
    let families = Enumerator::new(scene).families(kind);
    let names: &[&'static str] = match kind {
        Kind::Single => &["plain", "relation", "extreme"],
        Kind::Multi => &["plural", "relation", "conjunction"],
        Kind::NoTarget => &["plain", "relation"],
    };
    let available: Vec<(usize, &Vec<Candidate>)> = families.iter().enumerate().filter(|(_, f)| !f.is_empty()).collect();
    let &(family, candidates) = rng.pick(&available)?;
    let c = rng.pick(candidates)?;
    Some(Referring {
        text: words(&c.form, c.targets.len(), rng),
        targets: c.targets.clone(),
        kind,
        family: names.get(family).copied().unwrap_or("plain"),
    })
}
