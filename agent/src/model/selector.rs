//! Label selectors (`metav1.LabelSelector`): `matchLabels` and
//! `matchExpressions`, all of which must hold.

use std::collections::BTreeSet;

use super::Labels;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub match_labels: Labels,
    pub expressions: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    In(BTreeSet<String>),
    /// Also matches objects without the key.
    NotIn(BTreeSet<String>),
    Exists,
    /// Matches objects without the key.
    DoesNotExist,
}

impl LabelSelector {
    /// `{}`: selects everything.
    pub fn everything() -> Self {
        LabelSelector::default()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.expressions.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    pub fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match &self.operator {
            Operator::In(values) => value.is_some_and(|v| values.contains(v)),
            Operator::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn req(key: &str, operator: Operator) -> LabelSelector {
        LabelSelector {
            match_labels: Labels::new(),
            expressions: vec![Requirement { key: key.into(), operator }],
        }
    }

    fn set(values: &[&str]) -> BTreeSet<String> {
        values.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(LabelSelector::everything().matches(&Labels::new()));
        assert!(LabelSelector::everything().matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_all_must_hold() {
        let sel =
            LabelSelector { match_labels: labels(&[("app", "web"), ("tier", "fe")]), expressions: vec![] };
        assert!(sel.matches(&labels(&[("app", "web"), ("tier", "fe"), ("x", "y")])));
        assert!(!sel.matches(&labels(&[("app", "web")])));
        assert!(!sel.matches(&labels(&[("app", "web"), ("tier", "be")])));
    }

    #[test]
    fn in_needs_the_key() {
        let sel = req("env", Operator::In(set(&["prod", "qa"])));
        assert!(sel.matches(&labels(&[("env", "qa")])));
        assert!(!sel.matches(&labels(&[("env", "dev")])));
        assert!(!sel.matches(&Labels::new()));
    }

    #[test]
    fn not_in_matches_objects_without_the_key() {
        let sel = req("env", Operator::NotIn(set(&["prod"])));
        assert!(sel.matches(&Labels::new()));
        assert!(sel.matches(&labels(&[("env", "dev")])));
        assert!(!sel.matches(&labels(&[("env", "prod")])));
    }

    #[test]
    fn exists_and_does_not_exist() {
        assert!(req("k", Operator::Exists).matches(&labels(&[("k", "")])));
        assert!(!req("k", Operator::Exists).matches(&Labels::new()));
        assert!(req("k", Operator::DoesNotExist).matches(&Labels::new()));
        assert!(!req("k", Operator::DoesNotExist).matches(&labels(&[("k", "v")])));
    }
}
