"""SleepTrain: teach a language model new facts during "sleep" and keep them."""
