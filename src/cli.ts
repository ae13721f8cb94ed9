#!/usr/bin/env node
console.log('ep-actors: under construction');
