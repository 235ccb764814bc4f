//! Rewrite rules: a name, the algebra it relies on, a left-hand pattern, a right-hand
//! pattern and conditions. Rules come from rule files ([`crate::ruleset`]) or from Rust.

use std::sync::{Arc, Mutex};

use egg::{Applier, Id, PatternAst, SearchMatches, Searcher, Subst, Symbol, Var};
use fusec_ir::op::Attr;
use fusec_ir::Op;

use crate::analysis::{merge_provenance, FGraph, TypeAnalysis};
use crate::condition::{CondArg, CondCtx, CondError, CondFn};
use crate::lang::ENode;
use crate::pattern::{instantiate_op, match_class, Match, Pat};

/// An argument of a condition as written in a rule.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgPat {
    Var(String),
    AttrVar(String),
    Lit(Attr),
}

/// A condition written in Rust over a whole match.
pub type MatchCheck = Arc<dyn Fn(&CondCtx<'_>, &Match) -> Result<(), CondError> + Send + Sync>;

/// Why a match does not satisfy a rule: its text is the near miss's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unmet {
    #[error("unknown condition `{0}`")]
    UnknownCondition(String),
    /// The condition, as written or described, and why it does not hold.
    #[error("({condition}): {reason}")]
    Condition {
        condition: String,
        reason: CondError,
    },
}

/// A condition as written: `(name args...)`, or a Rust closure over the match.
#[derive(Clone)]
pub enum Condition {
    Named {
        name: String,
        args: Vec<ArgPat>,
    },
    Rust {
        description: String,
        check: MatchCheck,
    },
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::Named { name, args } => write!(f, "({name} {args:?})"),
            Condition::Rust { description, .. } => write!(f, "<rust: {description}>"),
        }
    }
}

/// A rewrite rule.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    /// The rule file (topic) it came from, or `rust` for rules added in code.
    pub topic: String,
    /// The comment stating the algebra the rule relies on.
    pub algebra: String,
    pub lhs: Pat,
    pub rhs: Pat,
    pub conditions: Vec<Condition>,
    /// Where a rule file defines it (`file:line`), for errors found after loading.
    pub location: Option<String>,
}

/// Why a rule is malformed, or failed when applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rule `{rule}`: {message}")]
pub struct RuleError {
    pub rule: String,
    pub message: String,
}

impl Rule {
    /// A rule from pattern text, for the Rust API. Check it with [`Rule::validate`]
    /// (the [`crate::RuleSet`] does when the rule is added).
    pub fn new(name: &str, algebra: &str, lhs: &str, rhs: &str) -> Result<Rule, RuleError> {
        let err = |side: &str, e: crate::pattern::PatError| RuleError {
            rule: name.to_string(),
            message: format!("{side} at offset {}: {}", e.offset, e.message),
        };
        Ok(Rule {
            name: name.to_string(),
            topic: "rust".into(),
            algebra: algebra.to_string(),
            lhs: Pat::parse(lhs).map_err(|e| err("left-hand side", e))?,
            rhs: Pat::parse(rhs).map_err(|e| err("right-hand side", e))?,
            conditions: Vec::new(),
            location: None,
        })
    }

    /// Adds a condition written in Rust.
    pub fn when(
        mut self,
        description: &str,
        check: impl Fn(&CondCtx<'_>, &Match) -> Result<(), CondError> + Send + Sync + 'static,
    ) -> Rule {
        self.conditions.push(Condition::Rust {
            description: description.to_string(),
            check: Arc::new(check),
        });
        self
    }

    /// Static checks: every right-hand variable is bound on the left, no `_` on the
    /// right, the left is not a bare variable, conditions name known predicates and
    /// bound variables.
    pub fn validate(&self, known_conditions: &dyn Fn(&str) -> bool) -> Result<(), RuleError> {
        let fail = |message: String| {
            Err(RuleError {
                rule: self.name.clone(),
                message,
            })
        };
        if self.algebra.trim().is_empty() {
            return fail("has no comment stating its algebra".into());
        }
        if self.lhs.root_name().is_none() {
            return fail("the left-hand side must be an op, not a bare variable".into());
        }
        let lvars = self.lhs.vars();
        let lattrs = self.lhs.attr_vars();
        for v in self.rhs.vars() {
            if !lvars.contains(&v) {
                return fail(format!(
                    "variable `?{v}` is used on the right but not bound on the left"
                ));
            }
        }
        for v in self.rhs.attr_vars() {
            if !lattrs.contains(&v) {
                return fail(format!(
                    "attribute variable `${v}` is used on the right but not bound on the left"
                ));
            }
        }
        let mut rhs_problem = None;
        self.rhs.walk(&mut |p| {
            if let Pat::Op { attrs, .. } = p {
                if attrs
                    .iter()
                    .any(|(_, a)| *a == crate::pattern::AttrPat::Any)
                {
                    rhs_problem = Some("`_` may only appear on the left-hand side".to_string());
                }
            }
        });
        if let Some(p) = rhs_problem {
            return fail(p);
        }
        for c in &self.conditions {
            if let Condition::Named { name, args } = c {
                if !known_conditions(name) {
                    return fail(format!("unknown condition `{name}`"));
                }
                for a in args {
                    match a {
                        ArgPat::Var(v) if !lvars.contains(v) => {
                            return fail(format!("condition `{name}` uses unbound `?{v}`"))
                        }
                        ArgPat::AttrVar(v) if !lattrs.contains(v) => {
                            return fail(format!("condition `{name}` uses unbound `${v}`"))
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(())
    }
}

/// A rule that almost fired: its pattern matched but a condition did not hold.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct NearMiss {
    /// Eager-graph position (`%N` of the eager dump) of the node the pattern matched.
    pub at: usize,
    pub rule: String,
    pub reason: String,
}

/// A rule bound to its condition functions, as egg's searcher and applier.
pub struct EggRule {
    pub rule: Arc<Rule>,
    conditions: Vec<(Condition, Option<CondFn>)>,
    vars: Vec<(String, Var)>,
    pub near_misses: Mutex<Vec<NearMiss>>,
    pub errors: Mutex<Vec<RuleError>>,
}

impl std::fmt::Debug for EggRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EggRule")
            .field("rule", &self.rule.name)
            .finish()
    }
}

impl EggRule {
    pub fn new(rule: Arc<Rule>, lookup: &dyn Fn(&str) -> Option<CondFn>) -> EggRule {
        let conditions = rule
            .conditions
            .iter()
            .map(|c| match c {
                Condition::Named { name, .. } => (c.clone(), lookup(name)),
                Condition::Rust { .. } => (c.clone(), None),
            })
            .collect();
        let vars = rule
            .lhs
            .vars()
            .into_iter()
            .map(|v| {
                let var: Var = format!("?{v}")
                    .parse()
                    .expect("validated variable names parse");
                (v, var)
            })
            .collect();
        EggRule {
            rule,
            conditions,
            vars,
            near_misses: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        }
    }

    /// Checks every condition; the first that fails says why.
    fn check(&self, egraph: &FGraph, m: &Match) -> Result<(), Unmet> {
        let ctx = CondCtx { egraph };
        for (cond, f) in &self.conditions {
            match cond {
                Condition::Named { name, args } => {
                    let resolved: Vec<CondArg> = args
                        .iter()
                        .map(|a| match a {
                            ArgPat::Var(v) => CondArg::Class(m.vars[v]),
                            ArgPat::AttrVar(v) => CondArg::Attr(m.attrs[v].clone()),
                            ArgPat::Lit(l) => CondArg::Attr(l.clone()),
                        })
                        .collect();
                    let f = f
                        .as_ref()
                        .ok_or_else(|| Unmet::UnknownCondition(name.clone()))?;
                    f(&ctx, &resolved).map_err(|reason| Unmet::Condition {
                        condition: name.clone(),
                        reason,
                    })?;
                }
                Condition::Rust { description, check } => {
                    check(&ctx, m).map_err(|reason| Unmet::Condition {
                        condition: description.clone(),
                        reason,
                    })?;
                }
            }
        }
        Ok(())
    }

    /// Matches at `eclass` whose conditions hold.
    fn matches(&self, egraph: &FGraph, eclass: Id, limit: usize, record: bool) -> Vec<Match> {
        let mut all = Vec::new();
        match_class(
            egraph,
            &self.rule.lhs,
            eclass,
            Match::default(),
            limit,
            &mut all,
        );
        all.into_iter()
            .filter(|m| match self.check(egraph, m) {
                Ok(()) => true,
                Err(unmet) => {
                    // A one-op pattern "almost matches" wherever that op is; only a
                    // structural match of a larger pattern is worth reporting.
                    if record && self.rule.lhs.op_count() >= 2 {
                        if let Ok(mut nm) = self.near_misses.lock() {
                            nm.push(NearMiss {
                                at: egraph[eclass].data.origin,
                                rule: self.rule.name.clone(),
                                reason: unmet.to_string(),
                            });
                        }
                    }
                    false
                }
            })
            .collect()
    }

    /// Adds the right-hand side under `m`; `None` (with an error recorded) when a node
    /// does not type-check.
    fn instantiate(
        &self,
        egraph: &mut FGraph,
        pat: &Pat,
        m: &Match,
        origin: (usize, Option<u32>),
    ) -> Option<Id> {
        match pat {
            Pat::Var(v) => m.vars.get(v).copied(),
            Pat::Op {
                name,
                attrs,
                weight,
                children,
            } => {
                let mut ids = Vec::with_capacity(children.len());
                for c in children {
                    ids.push(self.instantiate(egraph, c, m, origin)?);
                }
                let op = match instantiate_op(name, attrs, weight, &m.attrs) {
                    Ok(op) => op,
                    Err(e) => return self.fail(e.to_string()),
                };
                let node = ENode { op, children: ids };
                if let Err(e) = TypeAnalysis::infer(egraph, &node) {
                    return self.fail(format!("its result does not type-check: {e}"));
                }
                let op = node.op.clone();
                egraph.analysis.next_origin = origin;
                let id = egraph.add(node);
                if matches!(op, Op::Fused(_)) {
                    let prov = self.provenance(egraph, m);
                    let slot = egraph[id].data.provenance.entry(op).or_default();
                    merge_provenance(slot, &prov);
                }
                Some(id)
            }
        }
    }

    fn fail(&self, message: String) -> Option<Id> {
        if let Ok(mut e) = self.errors.lock() {
            let err = RuleError {
                rule: self.rule.name.clone(),
                message,
            };
            if !e.contains(&err) {
                e.push(err);
            }
        }
        None
    }

    /// This rule, after the rules of any fused node it matched; the eager ops covered.
    fn provenance(&self, egraph: &FGraph, m: &Match) -> fusec_ir::Provenance {
        let mut p = fusec_ir::Provenance::default();
        for (class, op) in &m.nodes {
            let data = &egraph[*class].data;
            if matches!(op, Op::Fused(_)) {
                if let Some(inner) = data.provenance.get(op) {
                    merge_provenance(&mut p, inner);
                }
            } else if !op.is_leaf() {
                let c = format!("%{} {}", data.origin, op.name());
                if !p.covers.contains(&c) {
                    p.covers.push(c);
                }
            }
        }
        if !p.rules.contains(&self.rule.name) {
            p.rules.push(self.rule.name.clone());
        }
        p
    }
}

impl Searcher<ENode, TypeAnalysis> for EggRule {
    fn search_eclass_with_limit(
        &self,
        egraph: &FGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, ENode>> {
        let root = self.rule.lhs.root_name()?;
        if !egraph[eclass].nodes.iter().any(|n| n.op.name() == root) {
            return None;
        }
        let substs: Vec<Subst> = self
            .matches(egraph, eclass, limit, true)
            .into_iter()
            .map(|m| {
                let mut s = Subst::with_capacity(self.vars.len());
                for (name, var) in &self.vars {
                    s.insert(*var, m.vars[name]);
                }
                s
            })
            .collect();
        if substs.is_empty() {
            None
        } else {
            Some(SearchMatches {
                eclass,
                substs,
                ast: None,
            })
        }
    }

    fn vars(&self) -> Vec<Var> {
        self.vars.iter().map(|(_, v)| *v).collect()
    }
}

impl Applier<ENode, TypeAnalysis> for EggRule {
    fn apply_one(
        &self,
        egraph: &mut FGraph,
        eclass: Id,
        subst: &Subst,
        _ast: Option<&PatternAst<ENode>>,
        _rule_name: Symbol,
    ) -> Vec<Id> {
        // Recover the attribute bindings of this substitution by matching again.
        let found = self
            .matches(egraph, eclass, usize::MAX, false)
            .into_iter()
            .find(|m| {
                self.vars
                    .iter()
                    .all(|(name, var)| egraph.find(m.vars[name]) == egraph.find(subst[*var]))
            });
        let Some(m) = found else {
            return Vec::new();
        };
        let data = &egraph[eclass].data;
        let origin = (data.origin, data.layer);
        let Some(id) = self.instantiate(egraph, &self.rule.rhs, &m, origin) else {
            return Vec::new();
        };
        // The result must have the type of the value it replaces, or every user of
        // that value would stop type-checking when extraction picks it.
        let (want, got) = (&egraph[eclass].data.ty, &egraph[id].data.ty);
        if want != got {
            let show = |t: &Option<fusec_ir::Type>| {
                t.as_ref()
                    .map_or_else(|| "no type".to_string(), ToString::to_string)
            };
            self.fail(format!(
                "its result has type {} where the matched value has type {}",
                show(got),
                show(want)
            ));
            return Vec::new();
        }
        if egraph.union(eclass, id) {
            vec![id]
        } else {
            Vec::new()
        }
    }
}
