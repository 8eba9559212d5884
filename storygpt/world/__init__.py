"""The procedural story world: the embedded default dataset, written in the FlintstonesSV layout."""
