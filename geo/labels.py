"""Object names in GeoChat's answers: "two ships" <-> ("ship", 2), and the grounded sentence built from them.

GeoChat labels each group of boxes with a counted phrase (`<p>two planes</p> {..}{..}`). Tiling merges
groups from many tiles and the DOTA converter writes them from class names, so both use these helpers:
English plurals by the usual suffix rules, counts as words up to ten.
"""

COUNT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_LEADING_WORDS = set(COUNT_WORDS) | {"a", "an", "the", "all", "some", "several", "many", "few"}


def singular(word: str) -> str:
    """The singular of an English noun by suffix rules ("ships" -> "ship", "ferries" -> "ferry")."""
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 2:
        return word[:-1]
    return word


def plural(name: str) -> str:
    """The plural of a (possibly multi-word) object name: its last word gets the suffix ("storage tank" -> "storage tanks")."""
    head, _, last = name.rpartition(" ")
    if last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    elif last.endswith(("s", "sh", "ch", "x", "z")):
        last += "es"
    else:
        last += "s"
    return f"{head} {last}" if head else last


def object_name(label: str) -> str:
    """The object a label names, singular and without its count: "two storage tanks" -> "storage tank"."""
    words = label.lower().replace("-", " ").replace("_", " ").split()
    while len(words) > 1 and (words[0] in _LEADING_WORDS or words[0].isdigit()):
        words = words[1:]
    if not words:
        return ""
    return " ".join(words[:-1] + [singular(words[-1])])


def article(name: str) -> str:
    """ "a" or "an" before name (by its first letter)."""
    return "an" if name[:1].lower() in "aeiou" else "a"


def count_phrase(name: str, count: int) -> str:
    """ "a ship", "an airplane", "two ships", ..., "ten ships", "12 ships"."""
    if count == 1:
        return f"{article(name)} {name}"
    number = COUNT_WORDS[count] if count < len(COUNT_WORDS) else str(count)
    return f"{number} {plural(name)}"


def grounded_description(groups, subject="image") -> str:
    """[(object name, [box strings])] -> "The image shows <p>two ships</p> {..}{..} and <p>a plane</p> {..}." """
    parts = [f"<p>{count_phrase(name, len(boxes))}</p> {''.join(boxes)}" for name, boxes in groups if boxes]
    if not parts:
        return f"The {subject} shows no objects of the annotated classes."
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"The {subject} shows {body}."


def region_caption(name: str) -> str:
    """The [identify] answer for an object: "A ship." / "An airplane." """
    return f"{article(name).capitalize()} {name}."
