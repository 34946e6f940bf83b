package main

import (
	"runtime"
	"testing"
)

func TestRaiseProcs(t *testing.T) {
	cases := []struct {
		name  string
		start int
		env   string
		want  int
	}{
		{"two cores", 2, "", minProcs},
		{"one CPU in a container", 1, "", minProcs},
		{"many cores keep one P each", 32, "", 32},
		{"the operator's GOMAXPROCS wins", 2, "2", 2},
	}
	old := runtime.GOMAXPROCS(0)
	defer runtime.GOMAXPROCS(old)
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			runtime.GOMAXPROCS(tc.start)
			got := raiseProcs(func(k string) string {
				if k == "GOMAXPROCS" {
					return tc.env
				}
				return ""
			})
			if got != tc.want || runtime.GOMAXPROCS(0) != tc.want {
				t.Fatalf("raiseProcs = %d, GOMAXPROCS %d, want %d", got, runtime.GOMAXPROCS(0), tc.want)
			}
		})
	}
}
