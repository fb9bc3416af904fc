"""The label hierarchy: the one representation of the two levels FineDiffusion conditions on (paper §3.2).

A hierarchy is a plain, JSON-able dict, carried unchanged by datasets, latent caches, checkpoints, the DiT that
samples (its TieredEmbedder), FID statistics and generated samples:

    {"class_names": [K str], "superclass_names": [S str], "superclass_of": [K ints in [0, S)]}

iNaturalist 2021's is built in (`inat21_hierarchy`): the authors' FineDiffusion-iNat.pt carries none, and its
superclass rows are in the order of INAT21_SUPERCLASSES.
"""
from cli import UserError


def make_hierarchy(class_names, superclass_names, superclass_of):
    """A hierarchy (the dict above), checked. Names are data, never recovered from file names (iNat21 has
    "Ray-finned Fishes")."""
    if len(class_names) != len(superclass_of):
        raise UserError(f"{len(class_names)} class names but {len(superclass_of)} superclass_of entries")
    if any(not 0 <= s < len(superclass_names) for s in superclass_of):
        raise UserError(f"superclass_of holds ids outside [0, {len(superclass_names)})")
    return dict(class_names=[str(n) for n in class_names], superclass_names=[str(n) for n in superclass_names],
                superclass_of=[int(s) for s in superclass_of])


# Superclass ids are the row order of the authors' FineDiffusion-iNat.pt label table: do not reorder.
INAT21_SUPERCLASSES = ["Plants", "Insects", "Birds", "Fungi", "Reptiles", "Mammals", "Ray-finned Fishes",
                       "Amphibians", "Mollusks", "Arachnids", "Animalia"]

# iNat21 sorts its 10,000 species by taxonomy, so each supercategory is a contiguous id range (inclusive).
# Ids outside every range belong to the json's catch-all supercategory "Animalia" (worms, crustaceans, ...).
INAT21_ID_RANGES = [
    (4, 156, "Arachnids"),
    (175, 2700, "Insects"),
    (2756, 2938, "Ray-finned Fishes"),
    (2939, 3108, "Amphibians"),
    (3111, 4596, "Birds"),
    (4613, 4858, "Mammals"),
    (4859, 5171, "Reptiles"),
    (5219, 5387, "Mollusks"),
    (5388, 5728, "Fungi"),
    (5729, 9999, "Plants"),
]


def inat21_superclass_of(num_classes=10000):
    """superclass_of for iNat21 class ids 0..num_classes-1 from the built-in id-range table (no json needed)."""
    superclass_of = [INAT21_SUPERCLASSES.index("Animalia")] * num_classes
    for first, last, name in INAT21_ID_RANGES:
        for k in range(first, min(last, num_classes - 1) + 1):
            superclass_of[k] = INAT21_SUPERCLASSES.index(name)
    return superclass_of


def inat21_hierarchy():
    """iNat21's hierarchy without its json (e.g. to sample the authors' checkpoint): classes named by their
    5-digit id, as the dataset's folders begin (04021 is 04021_Animalia_...)."""
    return make_hierarchy([f"{k:05d}" for k in range(10000)], INAT21_SUPERCLASSES, inat21_superclass_of())


HIERARCHY_KEYS = ("class_names", "superclass_names", "superclass_of")


def read_hierarchy(obj, source):
    """A hierarchy read from a file (a checkpoint, a latent cache, a manifest, FID statistics): checked to be one,
    else one line naming the file."""
    if not isinstance(obj, dict) or set(obj) != set(HIERARCHY_KEYS) or \
            not all(isinstance(obj[k], (list, tuple)) for k in HIERARCHY_KEYS):
        raise UserError(f"{source}: its hierarchy is not a dict of the lists {', '.join(HIERARCHY_KEYS)}")
    names_ok = all(isinstance(n, str) for k in ("class_names", "superclass_names") for n in obj[k])
    if not names_ok or not all(isinstance(s, int) and not isinstance(s, bool) for s in obj["superclass_of"]):
        raise UserError(f"{source}: its hierarchy is damaged (names must be text and superclass_of integers)")
    try:
        return make_hierarchy(obj["class_names"], obj["superclass_names"], obj["superclass_of"])
    except UserError as e:
        raise UserError(f"{source}: its hierarchy is damaged ({e})") from None
