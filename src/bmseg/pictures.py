"""Colours of PLAN's tissue pictures, which REPORT explains in each picture's caption."""

PICTURE_COLOURS = {
    "brightfield": ((0, 170, 60), (40, 90, 230), (175, 175, 175), "green", "blue"),
    "fluorescence": ((255, 215, 0), (255, 60, 220), (110, 110, 110), "yellow", "magenta"),
}
"""Per modality: RGB of the tissue outline, the kept cores and the dropped cores, and the
names of the first two. The kept cores' wash is a saturated colour that stands out from the
background of its modality (blue on white glass; magenta on black, apart from the stains'
blue and green), the dropped cores a faint grey frame."""
