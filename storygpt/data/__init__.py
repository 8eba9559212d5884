"""Story datasets: one record type, readers for each layout, the referential extension."""
