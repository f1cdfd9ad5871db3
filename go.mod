module github.com/meshturbo/meshturbo

go 1.26
