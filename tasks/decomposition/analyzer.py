"""Reading plain-text requirements: which keywords they use (whole words only), what concerns they
raise, how complex the work looks, which capabilities it calls for and which template fits it.

Keywords are regular expressions matched as whole words: "fix(?:es|ed|ing)?" matches "fixed" but
never the "fix" inside "prefix" or "suffix", and "ui" never matches inside "build". Where keywords
overlap ("regression tests" and "regression"), the longest match wins, so a phrase is read as a
phrase and its words are not counted again.
"""

import re
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property

from agents.capabilities import CAPABILITIES

LOW, MEDIUM, HIGH = "low", "medium", "high"

# Ties between template scores go to the earlier, more specific template; "feature" is the
# fallback when nothing points anywhere.
TEMPLATE_PRIORITY = (
    "security_hardening",
    "bugfix",
    "microservice",
    "crud_api",
    "refactor",
    "documentation",
    "feature",
)
DEFAULT_TEMPLATE = "feature"
# Requirements lead with what they are about ("Add X, with tests and docs"): keywords among the
# first words count double, so a trailing "and docs" does not turn a feature into documentation.
HEADLINE_WORDS = 8

# What each concern asks of the agents. A concern is raised by any of its keywords.
CONCERN_CAPABILITIES: dict[str, tuple[str, ...]] = {
    "feature": ("code_generation",),
    "bug": ("debugging", "bug_fixing"),
    "investigation": ("troubleshooting", "root_cause_analysis"),
    "refactoring": ("refactoring",),
    "api": ("code_generation",),
    "ui": ("code_generation",),
    "data": ("system_design",),
    "architecture": ("architecture_planning",),
    "testing": ("test_generation", "testing"),
    "security": ("security_audit",),
    "compliance": ("compliance_check",),
    "performance": ("performance_analysis", "optimization"),
    "scaling": ("scaling",),
    "deployment": ("deployment", "configuration"),
    "monitoring": ("monitoring",),
    "documentation": ("documentation",),
}


@dataclass(frozen=True)
class Keyword:
    pattern: str  # a regular expression, matched case-insensitively as a whole word
    concern: str | None  # None: only a complexity signal
    weights: Mapping[str, int]  # template name -> how strongly this word points at it
    complexity: int = 0  # +1 for words that make work harder, -1 for words that make it smaller


def _kw(concern: str | None, weights: Mapping[str, int], complexity: int, *patterns: str) -> list[Keyword]:
    return [Keyword(p, concern, weights, complexity) for p in patterns]


NONE: Mapping[str, int] = {}

KEYWORDS: tuple[Keyword, ...] = tuple(
    # Bugs and their investigation.
    _kw("bug", {"bugfix": 3}, 0, r"bugs?", r"buggy", r"fix(?:es|ed|ing)?", r"hotfix(?:es)?", r"crash(?:es|ed|ing)?")
    + _kw("bug", {"bugfix": 3}, 0, r"regressions?", r"defects?", r"does(?:n['\u2019]t| not) work", r"not working")
    + _kw("bug", {"bugfix": 2}, 0, r"broken", r"tracebacks?", r"stack ?traces?", r"fail(?:s|ed|ing|ures?)?")
    + _kw("bug", {"bugfix": 2}, 0, r"incorrect(?:ly)?", r"wrong(?:ly)?")
    + _kw("bug", {"bugfix": 1}, 0, r"errors?", r"exceptions?")
    + _kw("investigation", {"bugfix": 2}, 0, r"root[- ]causes?", r"intermittent(?:ly)?", r"flaky")
    + _kw("investigation", {"bugfix": 2}, 0, r"debug(?:s|ged|ging)?", r"troubleshoot(?:s|ed|ing)?")
    + _kw("investigation", {"bugfix": 2}, 0, r"reproduc(?:e|es|ed|ing|ible|tion)")
    + _kw("investigation", {"bugfix": 2}, 1, r"race conditions?", r"deadlocks?", r"memory leaks?")
    + _kw("investigation", {"bugfix": 1}, 0, r"investigat(?:e|es|ed|ing|ion)")
    # Refactoring.
    + _kw("refactoring", {"refactor": 4}, 0, r"refactor(?:s|ed|ing)?", r"(?:tech|technical) debt", r"dead code")
    + _kw("refactoring", {"refactor": 3}, 0, r"restructur(?:e|es|ed|ing)", r"modulari[sz](?:e|es|ed|ing|ation)")
    + _kw("refactoring", {"refactor": 2}, 0, r"clean[- ]?up", r"simplif(?:y|ies|ied|ying)", r"decoupl(?:e|es|ed|ing)")
    + _kw("refactoring", {"refactor": 2}, 0, r"extract(?:s|ed|ing)?", r"rewrit(?:e|es|ing)", r"rewritten")
    + _kw("refactoring", {"refactor": 2}, 0, r"readability", r"maintainability")
    + _kw("refactoring", {"refactor": 1}, 0, r"duplicat(?:e|ed|ion)", r"renam(?:e|es|ed|ing)")
    + _kw("refactoring", {"refactor": 1}, 1, r"legacy")
    # APIs and their data.
    + _kw("api", {"crud_api": 5}, 0, r"crud", r"create,? read,? update,? (?:and |or )?delete")
    + _kw("api", {"crud_api": 3}, 0, r"rest(?:ful)? apis?", r"restful")
    + _kw("api", {"crud_api": 2}, 0, r"endpoints?", r"viewsets?", r"serializers?", r"graphql")
    + _kw("api", {"crud_api": 1}, 0, r"apis?", r"resources?", r"paginat(?:e|ed|ion)", r"openapi", r"swagger")
    + _kw("data", {"crud_api": 1}, 0, r"databases?", r"schemas?", r"postgres(?:ql)?", r"mysql", r"sqlite", r"sql")
    + _kw("data", {"crud_api": 1}, 0, r"persistence", r"persist(?:s|ed|ing)?")
    + _kw("data", {"crud_api": 1}, 1, r"migrat(?:e|es|ed|ing|ion|ions)")
    # Services, deployment, scale and operations.
    + _kw("architecture", {"microservice": 5}, 0, r"micro-?services?")
    + _kw("architecture", {"microservice": 3}, 0, r"(?:new|separate|standalone|independent) services?")
    + _kw("architecture", {"microservice": 2}, 0, r"service mesh", r"api gateway", r"message (?:queue|broker|bus)s?")
    + _kw("architecture", {"microservice": 2}, 0, r"grpc", r"kafka", r"rabbitmq", r"event[- ]driven")
    + _kw("architecture", {"microservice": 1}, 0, r"services?", r"architecture", r"architectural")
    + _kw("architecture", NONE, 0, r"design(?:s|ed|ing)?", r"boundar(?:y|ies)")
    + _kw("deployment", {"microservice": 2}, 0, r"docker(?:file)?", r"containers?", r"containeri[sz](?:e|ed|ation)")
    + _kw("deployment", {"microservice": 2}, 0, r"kubernetes", r"k8s", r"helm")
    + _kw("deployment", {"microservice": 1}, 0, r"deploy(?:s|ed|ing|ments?)?")
    + _kw("deployment", NONE, 0, r"configuration", r"config", r"environment variables?", r"ci/cd", r"pipelines?")
    + _kw("scaling", {"microservice": 2}, 1, r"autoscal(?:e|es|ed|ing)", r"high availability")
    + _kw("scaling", {"microservice": 1}, 0, r"scal(?:e|es|ed|ing)", r"replicas?", r"load[- ]balanc(?:er|ers|ing)")
    + _kw("scaling", NONE, 1, r"scalab(?:le|ility)", r"horizontal(?:ly)?")
    + _kw("monitoring", {"microservice": 1}, 0, r"health[- ]?checks?", r"observability")
    + _kw("monitoring", NONE, 0, r"monitor(?:s|ed|ing)?", r"metrics", r"alert(?:s|ed|ing)?", r"tracing")
    + _kw("monitoring", NONE, 0, r"logging", r"prometheus", r"grafana")
    # Security and compliance.
    + _kw("security", {"security_hardening": 4}, 0, r"harden(?:s|ed|ing)?", r"vulnerabilit(?:y|ies)", r"vulnerable")
    + _kw("security", {"security_hardening": 4}, 0, r"cves?", r"xss", r"csrf", r"ssrf", r"owasp", r"security audit")
    + _kw("security", {"security_hardening": 4}, 0, r"pen(?:etration)?[- ]?test(?:s|ing)?")
    + _kw("security", {"security_hardening": 3}, 0, r"security", r"(?:sql |command )?injection", r"exploit(?:s|able)?")
    + _kw("security", {"security_hardening": 2}, 0, r"secur(?:e|es|ed|ing|ely)", r"sanitiz(?:e|es|ed|ing|ation)")
    + _kw("security", {"security_hardening": 2}, 0, r"encrypt(?:s|ed|ing|ion)?", r"secrets?")
    + _kw("security", {"security_hardening": 1}, 0, r"tls", r"ssl", r"certificates?", r"audit(?:s|ed|ing)?")
    # Login and access control are security concerns of a feature, not a hardening job by themselves.
    + _kw("security", NONE, 0, r"auth[nz]?", r"authenticat(?:e|es|ed|ing|ion)", r"authori[sz](?:e|es|ed|ing|ation)")
    + _kw("security", NONE, 0, r"oauth2?", r"jwt", r"sso", r"log[- ]?in", r"passwords?", r"permissions?", r"rbac")
    + _kw("security", NONE, 0, r"2fa", r"mfa", r"rate[- ]limit(?:s|ed|ing|er)?", r"throttl(?:e|es|ed|ing)")
    + _kw("compliance", {"security_hardening": 2}, 0, r"gdpr", r"hipaa", r"pci(?:[- ]dss)?", r"soc ?2", r"sox")
    + _kw("compliance", {"security_hardening": 2}, 0, r"compliance", r"compliant", r"regulat(?:ion|ions|ory)")
    + _kw("compliance", {"security_hardening": 1}, 0, r"audit (?:log|trail)s?", r"privacy", r"pii", r"personal data")
    + _kw("compliance", NONE, 0, r"data retention", r"retention polic(?:y|ies)")
    # Performance.
    + _kw("performance", {"refactor": 1}, 0, r"optimi[sz](?:e|es|ed|ing|ation)", r"bottlenecks?", r"profil(?:e|ing)")
    + _kw("performance", {"refactor": 1}, 0, r"performance", r"latency", r"slow(?:er|ly|ness)?", r"faster")
    + _kw("performance", NONE, 0, r"throughput")
    + _kw("performance", NONE, 0, r"speed ?up", r"cach(?:e|es|ed|ing)", r"memory usage", r"n\+1")
    # Tests. "regression tests" is read as one phrase, so it is not a bug report.
    + _kw("testing", NONE, 0, r"tests?", r"testing", r"tested", r"unit tests?", r"integration tests?", r"coverage")
    + _kw("testing", NONE, 0, r"regression tests?", r"e2e", r"end[- ]to[- ]end", r"pytest", r"test suites?")
    # Documentation. "docs" is weaker than "documentation": "with tests and docs" is a part of
    # most work, not the work itself.
    + _kw("documentation", {"documentation": 4}, 0, r"documentation", r"document(?:s|ed|ing)?", r"api reference")
    + _kw("documentation", {"documentation": 3}, 0, r"readme", r"docstrings?", r"tutorials?", r"runbooks?")
    + _kw("documentation", {"documentation": 2}, 0, r"guides?", r"how[- ]?tos?", r"changelog", r"wiki", r"typos?")
    + _kw("documentation", {"documentation": 2}, 0, r"docs")
    + _kw("documentation", {"documentation": 1}, 0, r"explain(?:s|ed|ing)?", r"onboarding")
    # User interfaces.
    + _kw("ui", NONE, 0, r"ui", r"ux", r"user interfaces?", r"front[- ]?end", r"pages?", r"forms?", r"buttons?")
    + _kw("ui", NONE, 0, r"css", r"html", r"react", r"vue", r"angular", r"dashboards?", r"screens?", r"dark mode")
    # Building something new.
    + _kw("feature", {"feature": 3}, 0, r"features?")
    + _kw("feature", {"feature": 2}, 0, r"add(?:s|ed|ing)?", r"implement(?:s|ed|ing|ation)?", r"build(?:s|ing)?")
    + _kw("feature", {"feature": 2}, 0, r"introduc(?:e|es|ed|ing)")
    + _kw("feature", {"feature": 1}, 0, r"support(?:s|ed|ing)?", r"new", r"creat(?:e|es|ed|ing)", r"enabl(?:e|es|ed)")
    + _kw("feature", {"feature": 1}, 0, r"allow(?:s|ed|ing)?", r"let users?", r"integrat(?:e|es|ed|ing|ion)")
    # Size hints that do not raise a concern of their own.
    + _kw(None, NONE, 1, r"distributed", r"concurren(?:t|cy)", r"real[- ]?time", r"multi[- ]?tenan(?:t|cy)")
    + _kw(None, NONE, 1, r"zero[- ]downtime", r"backwards?[- ]compatib(?:le|ility)", r"transactions?", r"complex")
    + _kw(None, NONE, 1, r"across (?:all|every|several|many|multiple)", r"large")
    + _kw(None, NONE, -1, r"simple", r"small", r"trivial", r"minor", r"quick(?:ly)?", r"tiny", r"one[- ]liner?")
    + _kw(None, NONE, -1, r"straightforward")
)

# (?<![^\W_]) is "not preceded by a letter or digit": unlike \b it treats "_" as a separator and,
# unlike [a-z0-9], it knows that "é" is a letter, so "préfix" does not contain the word "fix".
_PATTERNS = tuple(re.compile(rf"(?<![^\W_])(?:{kw.pattern})(?![^\W_])", re.IGNORECASE) for kw in KEYWORDS)
_WORD = re.compile(r"[^\W_]+")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n\s*")
# [ \t], not \s: \s also matches newlines, and on a text of blank lines every "^\s*" would scan to
# the end of the text (quadratic time on 20,000 newlines).
_LIST_ITEM = re.compile(r"^[ \t]*(?:[-*\u2022]|\d+[.)])[ \t]+", re.MULTILINE)


@dataclass(frozen=True)
class Match:
    start: int
    end: int
    text: str  # as written, lower-cased
    keyword: Keyword


@dataclass(frozen=True)
class Analysis:
    requirements: str
    matches: tuple[Match, ...]
    complexity: str
    concerns: tuple[str, ...]  # in order of first mention
    capabilities: tuple[str, ...]  # inferred from the concerns, in CAPABILITIES order
    scores: Mapping[str, int]  # template name -> score
    template: str  # the best-scoring template

    @property
    def keywords(self) -> list[str]:
        """Distinct matched keywords in order of first appearance."""
        return list(dict.fromkeys(m.text for m in self.matches))

    @cached_property
    def _sentence_spans(self) -> list[tuple[int, int]]:
        return sentence_spans(self.requirements)

    @cached_property
    def sentence_count(self) -> int:
        """Non-empty sentences, lines or list items of the requirements."""
        return sum(1 for start, end in self._sentence_spans if self.requirements[start:end].strip())

    def sentences_about(self, concerns: Iterable[str], limit: int = 5) -> list[str]:
        """Up to `limit` sentences of the requirements that raise any of `concerns`."""
        wanted = set(concerns)
        spans = self._sentence_spans
        starts = [start for start, _ in spans]
        picked: dict[int, None] = {}
        for match in self.matches:
            if match.keyword.concern in wanted:
                picked[bisect_right(starts, match.start) - 1] = None
        found = [self.requirements[spans[i][0] : spans[i][1]].strip() for i in sorted(picked)]
        return [s for s in found if s][:limit]


def analyze(requirements: str) -> Analysis:
    """Read the requirements; pure and deterministic."""
    matches = find_keywords(requirements)
    concerns = tuple(dict.fromkeys(m.keyword.concern for m in matches if m.keyword.concern))
    scores = template_scores(requirements, matches)
    return Analysis(
        requirements=requirements,
        matches=matches,
        complexity=estimate_complexity(requirements, matches, concerns),
        concerns=concerns,
        capabilities=infer_capabilities(concerns),
        scores=scores,
        template=infer_template(scores),
    )


def find_keywords(text: str) -> tuple[Match, ...]:
    """Whole-word keyword matches, longest first where they overlap, in text order."""
    found = [
        (hit.start(), hit.end(), keyword)
        for pattern, keyword in zip(_PATTERNS, KEYWORDS, strict=True)
        for hit in pattern.finditer(text)
    ]
    found.sort(key=lambda item: (item[0], -(item[1] - item[0])))
    kept: list[Match] = []
    covered_until = 0
    for start, end, keyword in found:
        if start >= covered_until:
            kept.append(Match(start, end, " ".join(text[start:end].lower().split()), keyword))
            covered_until = end
    return tuple(kept)


def template_scores(text: str, matches: Iterable[Match]) -> dict[str, int]:
    """Each distinct keyword counts once per template, double within the headline."""
    headline_end = _headline_end(text)
    scores = dict.fromkeys(TEMPLATE_PRIORITY, 0)
    best: dict[tuple[str, str], int] = {}
    for match in matches:
        factor = 2 if match.start < headline_end else 1
        for template, weight in match.keyword.weights.items():
            # Keyed by pattern: "fix" and "fixed" are one keyword and count once.
            key = (template, match.keyword.pattern)
            best[key] = max(best.get(key, 0), weight * factor)
    for (template, _), points in best.items():
        scores[template] += points
    return scores


def infer_template(scores: Mapping[str, int]) -> str:
    # max() keeps the first of equal scores, and TEMPLATE_PRIORITY lists the specific ones first.
    best = max(TEMPLATE_PRIORITY, key=lambda name: scores.get(name, 0))
    return best if scores.get(best, 0) > 0 else DEFAULT_TEMPLATE


def infer_capabilities(concerns: Iterable[str]) -> tuple[str, ...]:
    wanted = {cap for concern in concerns for cap in CONCERN_CAPABILITIES.get(concern, ())}
    return tuple(cap for cap in CAPABILITIES if cap in wanted)


def estimate_complexity(text: str, matches: Iterable[Match], concerns: Iterable[str]) -> str:
    """low / medium / high from length, list items, distinct concerns and size words."""
    words = len(_WORD.findall(text))
    points = (words > 40) + (words > 150)
    points += len(_LIST_ITEM.findall(text)) >= 4
    distinct = len(set(concerns) - {"feature"})
    points += (distinct >= 3) + (distinct >= 5)
    hints = sum({m.keyword.pattern: m.keyword.complexity for m in matches}.values())  # each keyword once
    points += max(-2, min(2, hints))
    if points <= 0:
        return LOW
    return MEDIUM if points <= 2 else HIGH


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence, line or list item."""
    spans, start = [], 0
    for separator in _SENTENCE_END.finditer(text):
        spans.append((start, separator.start()))
        start = separator.end()
    spans.append((start, len(text)))
    return spans


def _headline_end(text: str) -> int:
    words = list(_WORD.finditer(text))
    return words[HEADLINE_WORDS - 1].end() if len(words) >= HEADLINE_WORDS else len(text)
