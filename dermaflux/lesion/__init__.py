"""Domain knowledge every stage shares: the diagnosis taxonomy, lesion attributes and the caption template."""
