"""Training the classifier with Lightning, from cached features of a frozen backbone."""
