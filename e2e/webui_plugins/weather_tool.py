"""
title: Weather
author: moeserve
description: A stand-in for a weather service with a fixed answer, so that a check can tell the tool's result in the chat.
version: 0.1.0
"""


class Tools:
    def __init__(self) -> None:
        pass

    def get_current_weather(self, city: str) -> str:
        """
        Get the current weather in a city.
        :param city: The name of the city, e.g. Paris.
        :return: The weather in that city.
        """
        return f"Sunny, 21 °C in {city}"
