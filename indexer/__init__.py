"""medrag's offline side: sources -> manifest -> decode -> encode -> versioned index."""
