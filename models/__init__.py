"""The zoo's entries, one JSON file per published model; installed as `harmonization.models.entries`."""
