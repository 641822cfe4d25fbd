"""Offline word lists behind the name, organisation and address rules.

* Given and family names, company suffixes, street suffixes and place names: the locale
  providers of ``Faker`` (about 80 locales; 30k given names, 28k family names).
* Frequent lower-case English words: spaCy's English stop words and Faker's ``en_US`` lorem list.
* English word frequencies: ``wordfreq`` (Zipf scale, log10 of occurrences per 10^9 words + 9),
  used to tell a rare capitalised token (likely a proper noun) from a capitalised common word.

Both ship inside their wheels; nothing is downloaded. Loading takes about a second, so a process
builds one :class:`Lexicon` (``Lexicon.load`` caches it) and shares it read-only.
"""

from __future__ import annotations

import functools
import importlib
import math
import pkgutil
from dataclasses import dataclass
from types import ModuleType

# Generic organisation designators (legal forms and common trailing words), multilingual.
ORG_WORDS = frozenset(
    """inc inc. incorporated llc l.l.c. ltd ltd. limited corp corp. corporation co co. company plc
    gmbh ag kg se sa s.a. sas sarl srl s.r.l. spa s.p.a. bv b.v. nv n.v. oy oyj ab asa as a/s aps
    kk k.k. pty lp llp pllc group holdings holding partners associates technologies technology
    tech systems solutions software labs laboratories industries international enterprises
    ventures capital bank bancorp insurance financial consulting services media networks
    communications pharmaceuticals pharma foundation institute university college trust agency
    studios brands motors airlines energy logistics analytics""".split()
)

# Street designators that follow the street name as a separate word (plus Faker's list).
STREET_WORDS = frozenset(
    """street st st. avenue ave ave. road rd rd. lane ln ln. drive dr dr. boulevard blvd blvd.
    court ct ct. place pl pl. square sq terrace ter way parkway pkwy highway hwy circle cir trail
    alley row crescent close gardens grove mews walk hill heights park ridge point loop crossing
    plaza path pike route rte terrasse tér út utca körút rakpart sor köz""".split()
)

# Street designators that start the street name (Romance, Slavic, Greek and other languages).
STREET_PREFIXES = frozenset(
    """rua rue via viale vicolo piazza piazzale largo corso calle carrer camino avenida av. avda
    paseo plaza travessa praça estrada alameda strada ulica ul. utca ut. odos boulevard chemin allée
    route impasse quai rambla ronda""".split()
)

# Street designators fused to the end of the street name (Nordic, Germanic, Baltic, Dutch).
STREET_ENDINGS = (
    "katu",
    "tie",
    "kuja",
    "polku",
    "raitti",
    "väylä",
    "vej",
    "vænget",
    "gade",
    "stræde",
    "allé",
    "straße",
    "strasse",
    "str.",
    "weg",
    "gasse",
    "platz",
    "allee",
    "ring",
    "damm",
    "ufer",
    "laan",
    "straat",
    "plein",
    "gracht",
    "kade",
    "singel",
    "gatan",
    "vägen",
    "gränd",
    "stigen",
    "veien",
    "vegen",
    "gata",
    "tee",
    "puiestee",
    "iela",
    "gatvė",
    "utca",
    "ulica",
    "street",
    "road",
)


def _provider_attr(pkg: ModuleType, attrs: tuple[str, ...]) -> set[str]:
    out: set[str] = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        provider = getattr(importlib.import_module(f"{pkg.__name__}.{info.name}"), "Provider", None)
        if provider is None:
            continue
        for attr in attrs:
            value = provider.__dict__.get(attr)
            if isinstance(value, (list, tuple, dict, set, frozenset)):
                out.update(v.strip() for v in value if isinstance(v, str) and v.strip())
    return out


def _single_tokens(values: set[str]) -> frozenset[str]:
    """Latin-script or other alphabetic single words, at least two letters long."""
    out = set()
    for v in values:
        for part in v.replace("-", " ").split():
            if len(part) >= 2 and part.replace("'", "").replace(".", "").isalpha():
                out.add(part)
    return frozenset(out)


@dataclass(frozen=True)
class Lexicon:
    """Read-only word lists (see module docstring for sources)."""

    given_names: frozenset[str]
    family_names: frozenset[str]
    places: frozenset[str]
    street_words: frozenset[str]
    org_words: frozenset[str]
    common_words: frozenset[str]  # frequent lower-case English words (stop words, lorem list)
    zipf: dict[str, float]  # lower-cased English word -> Zipf frequency
    street_endings: tuple[str, ...] = STREET_ENDINGS  # designators fused to the end of a street name

    def zipf_of(self, word: str) -> float:
        """Zipf frequency of ``word`` (case-insensitive); 0.0 for words wordfreq does not know.

        A hyphenated compound wordfreq does not list is as frequent as its rarest part
        ("well-known", "X-ray" are common; "Mayo-Walters" is not).
        """
        w = word.lower()
        z = self.zipf.get(w)
        if z is not None:
            return z
        if "-" in w:
            return min((self.zipf.get(p, 0.0) for p in w.split("-") if p), default=0.0)
        return 0.0

    def is_name(self, word: str) -> bool:
        return word in self.given_names or word in self.family_names

    @staticmethod
    @functools.lru_cache(maxsize=1)
    def load() -> Lexicon:
        """Build (once per process) from Faker and wordfreq; about one second."""
        import faker.providers.address as address
        import faker.providers.company as company
        import faker.providers.person as person
        from wordfreq import get_frequency_dict

        given = _provider_attr(person, ("first_names", "first_names_male", "first_names_female"))
        family = _provider_attr(person, ("last_names", "last_names_male", "last_names_female"))
        places = _provider_attr(
            address, ("cities", "city_names", "countries", "states", "provinces", "regions", "city_suffixes")
        )
        streets = _provider_attr(address, ("street_suffixes", "street_suffixes_long", "street_suffixes_short"))
        suffixes = _provider_attr(company, ("company_suffixes",))
        from faker.providers.lorem.en_US import Provider as Lorem
        from spacy.lang.en.stop_words import STOP_WORDS

        freq = get_frequency_dict("en", wordlist="best")
        zipf = {w: round(math.log10(f) + 9, 2) for w, f in freq.items() if f > 1e-9}
        return Lexicon(
            given_names=_single_tokens(given),
            family_names=_single_tokens(family),
            places=_single_tokens(places),
            street_words=STREET_WORDS | {s.lower() for s in _single_tokens(streets) if s[0].isupper()},
            org_words=ORG_WORDS | {s.lower() for s in suffixes if s.replace(".", "").isalpha()},
            common_words=frozenset(Lorem.word_list) | frozenset(STOP_WORDS),
            zipf=zipf,
            # Faker's lower-case suffixes are the fused ones ("Holm" + "vej", "Stor" + "gatan", "Solli" + "plassen")
            street_endings=tuple(
                sorted(set(STREET_ENDINGS) | {s for s in streets if s[0].islower() and s.isalpha() and len(s) >= 4})
            ),
        )
