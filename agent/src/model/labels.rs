//! Labels of an object: a small map kept as a sorted vector. Objects carry a
//! handful of labels; a BTreeMap's smallest node has room for eleven pairs,
//! so this holds them in a fraction of the memory (it matters at 10,000 pods,
//! each also copied into its identity) and compares them as fast.

use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    pub const fn new() -> Self {
        Labels(Vec::new())
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(key))
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.find(key).ok().map(|i| &self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// Sets a label; returns the value it had.
    pub fn insert(&mut self, key: String, value: String) -> Option<String> {
        match self.find(&key) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(i) => {
                self.0.insert(i, (key, value));
                None
            }
        }
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.find(key).ok().map(|i| self.0.remove(i).1)
    }

    /// In key order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromIterator<(String, String)> for Labels {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        // Collect through a BTreeMap: sorted, and the last value of a key wins.
        let map: BTreeMap<String, String> = iter.into_iter().collect();
        Labels(map.into_iter().collect())
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Self {
        Labels(map.into_iter().collect())
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a String, &'a String);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, String)>,
        fn(&'a (String, String)) -> (&'a String, &'a String),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_sorted_map() {
        let mut l: Labels = [("b".to_string(), "2".to_string()), ("a".to_string(), "1".to_string())].into();
        assert_eq!(l.keys().collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(l.insert("a".into(), "9".into()), Some("1".into()));
        assert_eq!(l.insert("c".into(), "3".into()), None);
        assert_eq!(l.get("a").map(String::as_str), Some("9"));
        assert_eq!(l.remove("b"), Some("2".into()));
        assert!(!l.contains_key("b"));
        assert_eq!(l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(), ["a=9", "c=3"]);
        let other: Labels = [("c".to_string(), "3".to_string()), ("a".to_string(), "9".to_string())].into();
        assert_eq!(l, other, "equal whatever the insertion order");
    }
}
