"""Oxford-102 Flowers (Nilsback and Zisserman, 2008) with Reed et al.'s captions (CVPR 2016).

Layout (``data.root`` holds both trees, or is the parent of a ``flowers/``, ``flowers102/``,
``102flowers/`` or ``oxford-102-flowers/`` folder holding them)::

    jpg/image_NNNNN.jpg                                          pictures, from 102flowers.tgz (8,189)
    cvpr2016_flowers/text_c10/class_NNNNN/image_NNNNN.txt        10 captions per picture, Reed's archive
    cvpr2016_flowers/trainvalclasses.txt, testclasses.txt        82 / 20 class folder names, one per line

Class id = int(NNNNN of class_NNNNN) - 1. ``setid.mat`` (a classification split) and the archive's
``images/*.t7`` features are not used. Splits, checks and messages: `xmr.data.formats.reed_captions`.
"""

from __future__ import annotations

from xmr.data.formats import common
from xmr.data.formats.reed_captions import ReedCaptions

NAME = "flowers102"
CAPTIONS = "cvpr2016_flowers"
LAYOUT = common.Layout(NAME, files=(f"{CAPTIONS}/trainvalclasses.txt",),
                       subdirs=("flowers", "flowers102", "102flowers", "oxford-102-flowers"))

read = ReedCaptions(
    layout=LAYOUT,
    captions=CAPTIONS,
    captions_archive="cvpr2016_flowers.tar.gz (Reed et al., CVPR 2016 captions)",
    pictures=("jpg",),
    pictures_archive="102flowers.tgz (Oxford-102 Flowers)",
    class_pattern=r"class_(\d+)",
    example_class="class_00001",
    pictures_per_class=False,
)
