//! Bounded state, each mechanism once: a map that never outgrows its
//! limit, a fixed-window rate limit and a token bucket. Time comes in as an
//! argument, so each is tested without a clock.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// What a full [`BoundedMap`] does with a new key once its stale entries
/// are gone and it is still full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    /// Refuse the new key: what is remembered stays (bans, limits).
    Refuse,
    /// Forget everything: a cache, which only costs lookups to refill.
    Clear,
}

/// A map with at most `max` entries. A new key finds room by dropping the
/// entries the caller calls stale; failing that, [`Overflow`] decides.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    map: HashMap<K, V>,
    max: usize,
    overflow: Overflow,
}

impl<K: Eq + Hash, V> BoundedMap<K, V> {
    pub fn new(max: usize, overflow: Overflow) -> Self {
        Self {
            map: HashMap::new(),
            max,
            overflow,
        }
    }

    /// True when `key` is held or may be inserted now, having dropped stale
    /// entries (and, for [`Overflow::Clear`], everything) if the map was
    /// full.
    pub fn make_room(&mut self, key: &K, mut stale: impl FnMut(&V) -> bool) -> bool {
        if self.map.len() < self.max || self.map.contains_key(key) {
            return true;
        }
        self.map.retain(|_, v| !stale(v));
        if self.map.len() < self.max {
            return true;
        }
        match self.overflow {
            Overflow::Refuse => false,
            Overflow::Clear => {
                self.map.clear();
                self.max > 0
            }
        }
    }

    /// Inserts `value` under `key` if there is room (see
    /// [`BoundedMap::make_room`]); false when it was refused.
    pub fn insert(&mut self, key: K, value: V, stale: impl FnMut(&V) -> bool) -> bool {
        if !self.make_room(&key, stale) {
            return false;
        }
        self.map.insert(key, value);
        true
    }

    /// Inserts `value` under `key`; when the map is full of entries that
    /// are not stale, the one with the least `rank` (the oldest, for a
    /// ban) makes room. What the map remembers stays bounded, and a flood
    /// of new keys pushes out the oldest rather than being let through.
    pub fn insert_evicting<R: Ord>(
        &mut self,
        key: K,
        value: V,
        stale: impl FnMut(&V) -> bool,
        rank: impl Fn(&V) -> R,
    ) where
        K: Clone,
    {
        if !self.make_room(&key, stale) {
            let least = self
                .map
                .iter()
                .min_by_key(|(_, v)| rank(v))
                .map(|(k, _)| k.clone());
            if let Some(k) = least {
                self.map.remove(&k);
            }
        }
        if self.max > 0 {
            self.map.insert(key, value);
        }
    }

    /// The entry for `key`, made with `new` if there is room for it.
    pub fn get_or_insert_with(
        &mut self,
        key: K,
        stale: impl FnMut(&V) -> bool,
        new: impl FnOnce() -> V,
    ) -> Option<&mut V> {
        if !self.make_room(&key, stale) {
            return None;
        }
        Some(self.map.entry(key).or_insert_with(new))
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.get(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.contains_key(key)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map.remove(key)
    }

    pub fn retain(&mut self, keep: impl FnMut(&K, &mut V) -> bool) {
        self.map.retain(keep);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.map.len() >= self.max
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.map.values()
    }
}

/// A fixed-window rate limit: at most `limit` events per `window`.
#[derive(Debug, Clone, Copy)]
pub struct RateWindow {
    window: Duration,
    limit: u32,
    start: Instant,
    count: u32,
}

impl RateWindow {
    pub fn new(window: Duration, limit: u32, now: Instant) -> Self {
        Self {
            window,
            limit,
            start: now,
            count: 0,
        }
    }

    /// Counts one event at `now`; false when the window's limit is used up.
    pub fn allow(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.start) >= self.window {
            self.start = now;
            self.count = 0;
        }
        if self.count >= self.limit {
            return false;
        }
        self.count += 1;
        true
    }

    /// True once the window that began with the first counted event has
    /// passed: the entry says nothing any more.
    pub fn expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.start) >= self.window
    }
}

/// A token bucket: `rate` units per second, bursts up to `burst`. Taking
/// more than is left is allowed; the debt is the wait before going on.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_s: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate: rate_per_s.max(1) as f64,
            burst: burst as f64,
            tokens: burst as f64,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.burst);
        self.at = now;
    }

    /// Takes `n` units at `now` if that many are left; false (taking
    /// nothing) otherwise.
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// True when the bucket is full again at `now`: it says nothing any
    /// more.
    pub fn full(&self, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * self.rate;
        self.tokens + refill >= self.burst
    }

    /// Takes `n` units at `now`: how long to wait before using them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_map_drops_stale_entries_then_refuses_or_clears() {
        let mut bans: BoundedMap<u32, u32> = BoundedMap::new(2, Overflow::Refuse);
        assert!(bans.insert(1, 10, |_| false));
        assert!(bans.insert(2, 20, |_| false));
        assert!(!bans.insert(3, 30, |_| false), "full, nothing stale");
        assert!(bans.insert(1, 11, |_| false), "a held key is replaced");
        assert!(
            bans.insert(3, 30, |v| *v == 20),
            "the stale entry made room"
        );
        assert_eq!(bans.get(&2), None);
        assert_eq!((bans.get(&1), bans.get(&3)), (Some(&11), Some(&30)));
        // Evicting: the least-ranked entry makes room for a new one.
        bans.insert_evicting(4, 40, |_| false, |v| *v);
        assert_eq!(bans.len(), 2);
        assert_eq!((bans.get(&1), bans.get(&4)), (None, Some(&40)));
        assert_eq!(bans.get(&3), Some(&30));

        let mut cache: BoundedMap<u32, u32> = BoundedMap::new(2, Overflow::Clear);
        cache.insert(1, 1, |_| false);
        cache.insert(2, 2, |_| false);
        assert!(cache.insert(3, 3, |_| false));
        assert_eq!(cache.len(), 1, "a full cache starts over");
        assert!(cache.get_or_insert_with(4, |_| false, || 4).is_some());
        assert!(cache.is_full());
    }

    #[test]
    fn a_rate_window_counts_per_window() {
        let t0 = Instant::now();
        let mut w = RateWindow::new(Duration::from_secs(1), 2, t0);
        assert!(w.allow(t0));
        assert!(w.allow(t0));
        assert!(!w.allow(t0 + Duration::from_millis(999)));
        assert!(!w.expired(t0 + Duration::from_millis(999)));
        assert!(w.expired(t0 + Duration::from_secs(1)));
        assert!(w.allow(t0 + Duration::from_secs(1)), "a new window");
    }

    #[test]
    fn a_token_bucket_bursts_then_paces() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10_000, 10_000, t0);
        // A second's worth passes at once (the burst) ...
        assert_eq!(b.take(10_000, t0), Duration::ZERO);
        // ... then 5,000 more wait half a second.
        let wait = b.take(5_000, t0);
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // Refilled after the debt is paid and a second more.
        assert_eq!(
            b.take(10_000, t0 + Duration::from_millis(1500)),
            Duration::ZERO
        );
    }
}
